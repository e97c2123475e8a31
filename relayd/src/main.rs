//! `relayd`: the relay daemon.
//!
//! ```text
//! relayd --config relay.toml                 run
//! relayd --config relay.toml --check-config  validate and exit (0 ok, 1 invalid)
//! relayd pki init --dir pki --relays 1,2,3   create a development CA and node certificates
//! relayd token --app shop --secret-file s --channel live --user alice --role publisher
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand, ValueEnum};
use relay_core::token::Claims;
use relay_core::wire::client::Role;
use relay_net::pki::{Node, init_dev_pki};
use relayd::config::{Config, LogFormat, default_cluster_domain};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    version,
    about = "Edge relay daemon",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Config file (TOML).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Validate the config (certificates and secrets included) and exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Development PKI.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Issue a client token signed with an app secret (what an app backend does).
    Token(TokenArgs),
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create (or extend) a CA and node certificates in a folder.
    Init {
        /// Output folder.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// Relay ids to issue certificates for.
        #[arg(long, value_delimiter = ',')]
        relays: Vec<u32>,
        /// Control-plane node ids to issue certificates for.
        #[arg(long, value_delimiter = ',')]
        control_plane: Vec<u64>,
        /// Operator certificates (for relayctl), by name.
        #[arg(long, value_delimiter = ',')]
        operators: Vec<String>,
        /// Extra DNS names or IP addresses on every certificate.
        #[arg(long)]
        name: Vec<String>,
        /// Cluster domain of node names.
        #[arg(long, default_value_t = default_cluster_domain())]
        domain: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Publisher,
    Subscriber,
}

#[derive(clap::Args)]
struct TokenArgs {
    /// App id.
    #[arg(long)]
    app: String,
    /// App secret, hex.
    #[arg(
        long,
        conflicts_with = "secret_file",
        env = "RELAY_APP_SECRET",
        hide_env_values = true
    )]
    secret: Option<String>,
    /// File with the app secret, hex.
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Channel name.
    #[arg(long)]
    channel: String,
    /// User id.
    #[arg(long)]
    user: String,
    /// Role.
    #[arg(long, value_enum, default_value = "subscriber")]
    role: RoleArg,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Pki { command }) => return pki(command),
        Some(Command::Token(args)) => return token(args),
        None => {}
    }
    let Some(path) = cli.config else {
        eprintln!("relayd: --config FILE is required (see --help)");
        return ExitCode::from(2);
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("relayd: invalid config {}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    if cli.check_config {
        println!(
            "config OK: relay {} ({}), region {:?}, {} peers, {} static routes, {} apps",
            config.core.id,
            config.name,
            config.core.region,
            config.peers.len(),
            config.routes.entries().len(),
            config.core.apps.len()
        );
        return ExitCode::SUCCESS;
    }
    init_logging(&config.log_level, config.log_format);
    let runtime = match runtime(config.worker_threads) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("relayd: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("relayd: {e:#}");
            eprintln!("relayd: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// One worker thread runs everything on that thread: no cross-thread
/// wake-ups per packet, the most forwarding per CPU second. More threads
/// add throughput for the QUIC connection tasks at some cost per packet.
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

fn init_logging(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    if let Some(addr) = config.metrics_listen {
        let (recorder, exporter) = metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .build()?;
        metrics::set_global_recorder(recorder)?;
        tokio::spawn(exporter);
        tracing::info!(%addr, "metrics endpoint");
    }
    let cp = config.control_plane.clone();
    let tls = config.tls.clone();
    let info = controlplane::state::RelayInfo {
        name: config.name.clone(),
        region: config.core.region.clone(),
        location: config.location,
        addr: config.public_addr.clone(),
        capacity: cp.as_ref().map_or(0, |c| c.capacity),
    };
    let handle = std::sync::Arc::new(relayd::server::start(config).await?);
    let session = cp.map(|cp| tokio::spawn(relayd::cp_client::run(handle.clone(), cp, tls, info)));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: draining"),
    }
    if let Some(s) = session {
        s.abort();
    }
    handle.drain_and_stop().await;
    tracing::info!("stopped");
    Ok(())
}

fn pki(command: PkiCommand) -> ExitCode {
    let PkiCommand::Init {
        dir,
        relays,
        control_plane,
        operators,
        name,
        domain,
    } = command;
    let mut nodes: Vec<Node> = relays.iter().map(|&r| Node::Relay(r)).collect();
    nodes.extend(control_plane.iter().map(|&c| Node::ControlPlane(c)));
    nodes.extend(operators.into_iter().map(Node::Operator));
    if nodes.is_empty() {
        eprintln!(
            "relayd pki init: name at least one node (--relays, --control-plane, --operators)"
        );
        return ExitCode::from(2);
    }
    match init_dev_pki(&dir, &nodes, &domain, &name) {
        Ok(_) => {
            println!(
                "wrote CA and {} node certificates to {}",
                nodes.len(),
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("relayd pki init: {e}");
            ExitCode::from(1)
        }
    }
}

fn token(args: TokenArgs) -> ExitCode {
    let hex_text = match (&args.secret, &args.secret_file) {
        (Some(s), _) => s.trim().to_owned(),
        (None, Some(f)) => match std::fs::read_to_string(f) {
            Ok(s) => s.trim().to_owned(),
            Err(e) => {
                eprintln!("relayd token: {}: {e}", f.display());
                return ExitCode::from(1);
            }
        },
        (None, None) => {
            eprintln!("relayd token: give --secret, --secret-file or RELAY_APP_SECRET");
            return ExitCode::from(2);
        }
    };
    let Ok(secret) = hex::decode(&hex_text) else {
        eprintln!("relayd token: the secret is not hex");
        return ExitCode::from(1);
    };
    #[allow(clippy::disallowed_methods)] // expiry is wall-clock time
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let claims = Claims {
        app: args.app,
        channel: args.channel,
        user: args.user,
        role: match args.role {
            RoleArg::Publisher => Role::Publisher,
            RoleArg::Subscriber => Role::Subscriber,
        },
        expires: now + args.ttl,
    };
    println!("{}", claims.sign(&secret));
    ExitCode::SUCCESS
}
