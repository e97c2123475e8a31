//! `simulations`: the route-quality report and network simulations.
//!
//! ```text
//! cargo run -p simulations --release -- route-report
//! cargo run -p simulations --release -- run sea-3g-degradation --out out/sim
//! ```

#![allow(clippy::disallowed_methods)] // wall time of a run, for the report

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use simulations::plots;
use simulations::report::RouteReport;
use simulations::scenario::Scenario;
use simulations::sim::{Mechanism, RunResult, Sim, quantile};
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
    /// Run scenarios in the discrete-event simulator and write JSON and SVG
    /// reports; fails when a scenario's checks fail.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Scenario names (from simulations/scenarios/) or TOML files.
    #[arg(required = true)]
    scenarios: Vec<String>,
    /// Where reports go (one folder per scenario).
    #[arg(long, default_value = "out/sim")]
    out: PathBuf,
    /// Override the scenario's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// The short form (fewer relays, flows and subscribers; same timeline).
    #[arg(long)]
    short: bool,
    /// Folder with the measurements [default: ../shared/data, else the
    /// built-in world].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Use the built-in world even if the data folder exists.
    #[arg(long)]
    builtin: bool,
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
        Command::Run(args) => run(args),
    }
}

/// The country world: measurements from the data folder when it exists,
/// else the built-in world (and a note saying so).
fn load_world(
    data: Option<&Path>,
    builtin: bool,
    codes: &[&str],
    options: &CountryRttOptions,
) -> anyhow::Result<World> {
    let dir = if builtin {
        None
    } else {
        world::find_data_dir(data)?
    };
    Ok(match dir {
        Some(dir) => {
            let sites = match dir.join("wondernetwork-servers-2020-07-19.csv") {
                p if p.is_file() => world::wondernetwork_sites(&p, codes)?,
                _ => world::builtin_sites(codes)?,
            };
            World::from_country_rtt(&dir.join("country_rtt_stat.csv.gz"), sites, options)?
        }
        None => {
            if !builtin {
                eprintln!(
                    "note: ../shared/data not found (pass --data DIR); using the built-in world \
                     (great-circle fiber delay x {}-{} inflation), not measurements",
                    world::BUILTIN_INFLATION.0,
                    world::BUILTIN_INFLATION.1
                );
            }
            World::builtin(codes)?
        }
    })
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for name in &args.scenarios {
        let path = scenario_path(name);
        let mut scenario = Scenario::load(&path)?;
        if let Some(seed) = args.seed {
            scenario.seed = seed;
        }
        if args.short {
            scenario.shorten();
        }
        let codes: Vec<&str> = scenario
            .world
            .countries
            .iter()
            .map(String::as_str)
            .collect();
        let world = load_world(
            args.data.as_deref(),
            args.builtin,
            &codes,
            &CountryRttOptions::default(),
        )?;
        let out = args.out.join(&scenario.name);
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        println!(
            "== {} (seed {}, {}{} relays, {} s virtual)",
            scenario.name,
            scenario.seed,
            if args.short { "short form, " } else { "" },
            scenario.world.relays,
            scenario.duration_s
        );
        let sim = Sim::new(scenario, &world, args.short)?;
        let wall = std::time::Instant::now();
        let mut result = sim.run();
        result.wall_s = wall.elapsed().as_secs_f64();
        write_run(&result, &out)?;
        print!("{}", render_run(&result));
        println!("  reports: {}", out.display());
        if result.checks.iter().any(|c| !c.ok) {
            failed.push(format!("{} (seed {})", result.scenario, result.seed));
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("checks failed: {}", failed.join(", "));
    }
    Ok(())
}

/// A scenario by file path, or by name from `simulations/scenarios/`.
fn scenario_path(name: &str) -> PathBuf {
    let p = PathBuf::from(name);
    if p.is_file() || name.ends_with(".toml") {
        return p;
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(format!("{name}.toml"))
}

fn write_run(r: &RunResult, out: &Path) -> anyhow::Result<()> {
    let write = |file: &str, text: &str| {
        let p = out.join(file);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
    };
    write("result.json", &serde_json::to_string_pretty(r)?)?;
    write("poor-pairs.svg", &plots::poor_pairs(r))?;
    write("reroute-cdf.svg", &plots::reroute_cdf(r))?;
    write("flows.svg", &plots::flows(r))?;
    write("route-changes.svg", &plots::route_changes(r))?;
    if let Some(svg) = plots::streams(r) {
        write("streams.svg", &svg)?;
    }
    for (i, m) in r.maps.iter().enumerate() {
        write(&format!("map-{:.0}s.svg", m.at_s), &plots::world_map(r, i))?;
    }
    Ok(())
}

fn render_run(r: &RunResult) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "  {} relays, {} probed links, {} flows, {} sampled pairs; {} events in {:.1} s wall ({:.0}x real time)",
        r.relays.len(),
        r.links,
        r.flows,
        r.pairs,
        r.events_processed,
        r.wall_s,
        r.duration_s / r.wall_s.max(1e-9)
    );
    let (pending, completed) = r.backups_completed;
    if pending > 0 {
        let _ = writeln!(
            s,
            "  route tables: {pending} installed without backups, {completed} completed when the relay could use one"
        );
    }
    let (d, o, x) = r.poor_share;
    let _ = writeln!(
        s,
        "  poor pair-time: direct {:.1} %, overlay {:.1} %, oracle {:.1} %; overlay/oracle improvement {}",
        100.0 * d,
        100.0 * o,
        100.0 * x,
        r.overlay_vs_oracle
            .map_or("n/a".to_string(), |v| format!("{:.1} %", 100.0 * v))
    );
    for (name, m) in [
        ("local backup", Mechanism::Local),
        ("control plane", Mechanism::ControlPlane),
    ] {
        let v = r.reroute_seconds(m);
        if !v.is_empty() {
            let _ = writeln!(
                s,
                "  reroute via {name}: {} pairs, p50 {:.2} s, p95 {:.2} s",
                v.len(),
                quantile(&v, 0.5),
                quantile(&v, 0.95)
            );
        }
    }
    if r.unrecovered > 0 {
        let _ = writeln!(
            s,
            "  affected pairs not on a good path within 60 s: {}",
            r.unrecovered
        );
    }
    let _ = writeln!(
        s,
        "  route changes: {:.2} per pair per hour; {} route epochs",
        r.route_changes_per_pair_hour,
        r.epochs.len()
    );
    for st in &r.streams {
        let _ = writeln!(
            s,
            "  stream {}: {}/{} subscribers receiving, join to first media p50 {:.2} s p95 {:.2} s, delivered {:.2} %, latency p50 {:.0} ms p99 {:.0} ms, duplicates {}",
            st.channel,
            st.receiving,
            st.subscribers,
            quantile(&st.join_to_first_s, 0.5),
            quantile(&st.join_to_first_s, 0.95),
            100.0 * st.delivery,
            st.latency_p50_ms,
            st.latency_p99_ms,
            st.duplicates
        );
    }
    for c in &r.checks {
        let _ = writeln!(
            s,
            "  [{}] {}: {:.3} (bound {})",
            if c.ok { "ok" } else { "FAIL" },
            c.name,
            c.value,
            c.bound
        );
    }
    s
}

fn route_report(args: RouteReportArgs) -> anyhow::Result<()> {
    let codes: Vec<&str> = args.countries.iter().map(String::as_str).collect();
    let world = if let Some(matrix) = &args.matrix {
        World::from_matrix_csv(matrix, args.sites.as_deref())?
    } else {
        let options = CountryRttOptions {
            min_pings: args.min_pings,
            jitter_from_std: args.jitter_from_std,
        };
        load_world(args.data.as_deref(), args.builtin, &codes, &options)?
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
