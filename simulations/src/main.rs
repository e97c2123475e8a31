//! `simulations`: the route-quality report and network simulations.
//!
//! ```text
//! cargo run -p simulations --release -- route-report
//! ```

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use simulations::report::RouteReport;
use simulations::world::{self, CountryRttOptions, World};
use topology::RoutingConfig;

#[derive(Parser)]
#[command(
    version,
    about = "Route-quality report and simulations of the relay network"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compare, for every pair of relay sites, the direct path with the best
    /// overlay path, on real measurements.
    RouteReport(RouteReportArgs),
}

#[derive(clap::Args)]
struct RouteReportArgs {
    /// Folder with country_rtt_stat.csv.gz and the WonderNetwork site list
    /// [default: ../shared/data, else the built-in world].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Use a latency matrix instead: CSV with a header naming src,dst,rtt_ms
    /// and optionally jitter_ms,loss (one row per directed pair).
    #[arg(long, conflicts_with = "data")]
    matrix: Option<PathBuf>,
    /// With --matrix: coordinates of sites that are not country codes
    /// (CSV code,city,lat,lon).
    #[arg(long, requires = "matrix")]
    sites: Option<PathBuf>,
    /// Country codes to place relays in [default: the 48 of the built-in table].
    #[arg(long, value_delimiter = ',')]
    countries: Vec<String>,
    /// Drop country pairs measured with fewer pings.
    #[arg(long, default_value_t = 10)]
    min_pings: u64,
    /// Model link jitter as this factor times the pair's RTT standard
    /// deviation (0: no jitter; the data's std mostly reflects route changes).
    #[arg(long, default_value_t = 0.0)]
    jitter_from_std: f64,
    /// Use the built-in world even if the data folder exists.
    #[arg(long)]
    builtin: bool,
    /// Where to write the full result as JSON.
    #[arg(long, default_value = "out/route-report.json")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::RouteReport(args) => route_report(args),
    }
}

fn route_report(args: RouteReportArgs) -> anyhow::Result<()> {
    let codes: Vec<&str> = args.countries.iter().map(String::as_str).collect();
    let world = if let Some(matrix) = &args.matrix {
        World::from_matrix_csv(matrix, args.sites.as_deref())?
    } else {
        let data = if args.builtin {
            None
        } else {
            world::find_data_dir(args.data.as_deref())?
        };
        match data {
            Some(dir) => {
                let sites = match dir.join("wondernetwork-servers-2020-07-19.csv") {
                    p if p.is_file() => world::wondernetwork_sites(&p, &codes)?,
                    _ => world::builtin_sites(&codes)?,
                };
                let options = CountryRttOptions {
                    min_pings: args.min_pings,
                    jitter_from_std: args.jitter_from_std,
                };
                World::from_country_rtt(&dir.join("country_rtt_stat.csv.gz"), sites, &options)?
            }
            None => {
                if !args.builtin {
                    eprintln!(
                        "note: ../shared/data not found (pass --data DIR); using the built-in world \
                         (great-circle fiber delay x {}-{} inflation), not measurements",
                        world::BUILTIN_INFLATION.0,
                        world::BUILTIN_INFLATION.1
                    );
                }
                World::builtin(&codes)?
            }
        }
    };
    let report = RouteReport::compute(&world, &RoutingConfig::default());
    print!("{}", report.render_text());
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(&args.out, json).with_context(|| format!("writing {}", args.out.display()))?;
    println!("  full result: {}", args.out.display());
    Ok(())
}
