//! `controlplane`: a control-plane node.
//!
//! ```text
//! controlplane --config cp.toml                 run
//! controlplane --config cp.toml --check-config  validate and exit (0 ok, 1 invalid)
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use controlplane::config::CpConfig;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(version, about = "Edge relay control-plane node")]
struct Cli {
    /// Config file (TOML).
    #[arg(long, short)]
    config: PathBuf,
    /// Validate the config and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match CpConfig::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("controlplane: invalid config {}: {e}", cli.config.display());
            return ExitCode::from(1);
        }
    };
    if cli.check_config {
        println!(
            "config OK: node {} of {} initial members{}, data in {}",
            config.node.id,
            config.members.len(),
            if config.join { " (joining)" } else { "" },
            config.data_dir.display()
        );
        return ExitCode::SUCCESS;
    }
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("controlplane: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("controlplane: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(config: CpConfig) -> anyhow::Result<()> {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    metrics::set_global_recorder(recorder)?;
    let http = config.http_listen;
    let node = Arc::new(controlplane::server::start(config).await?);
    if let Some(addr) = http {
        let (node, metrics) = (node.clone(), metrics.clone());
        tokio::spawn(async move {
            if let Err(e) = controlplane::http::serve(addr, node, metrics).await {
                tracing::error!("http endpoint: {e:#}");
            }
        });
        tracing::info!(%addr, "http endpoint (metrics, status)");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping");
    Ok(())
}
