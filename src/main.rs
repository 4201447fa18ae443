//! The `cachegate` command: run, check, purge, version.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use cachegate::config::Config;

#[derive(Parser)]
#[command(
    name = "cachegate",
    version,
    about = "Read-through caching reverse proxy for legacy HTTP APIs"
)]
struct Cli {
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve: proxy listener plus admin listener, until SIGTERM/SIGINT.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and print the compiled rule table.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Purge tags or paths through a running instance's admin API.
    Purge {
        /// A tag to purge, e.g. user:42 (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// A path whose cached variants to purge, e.g. /user/42 (repeatable).
        #[arg(long = "path")]
        paths: Vec<String>,
        /// Purge everything.
        #[arg(long)]
        all: bool,
        /// Base URL of the admin listener.
        #[arg(long, default_value = "http://127.0.0.1:9091")]
        admin: String,
        /// Environment variable holding the admin token.
        #[arg(long, default_value = "CACHEGATE_ADMIN_TOKEN")]
        token_env: String,
    },
}

/// Log lines go to stdout through `cachegate::log`'s writer thread (no write, and no
/// wake-up of another thread, per line; never dropped). The guard writes what is left at exit.
fn init_tracing(format: LogFormat) -> cachegate::log::Guard {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("CACHEGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let guard = cachegate::log::start();
    let ansi = std::io::stdout().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(cachegate::log::Lines);
    match format {
        // Colours on a terminal; elsewhere the same text, formatted faster.
        LogFormat::Text if ansi => builder.init(),
        LogFormat::Text => builder.event_format(cachegate::log::Text).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    guard
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(cfg) => {
                println!("{}: ok", config.display());
                print!("{}", cachegate::config::compile::describe(&cfg.rules));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Purge {
            tags,
            paths,
            all,
            admin,
            token_env,
        } => match purge(tags, paths, all, &admin, &token_env) {
            Ok(body) => {
                println!("{body}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cachegate purge: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => {
            let _log = init_tracing(cli.log_format);
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            match run(cfg, config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cachegate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn run(cfg: Config, path: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Listen for SIGHUP before anything else: its default action would end the process.
    let hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; reload through the admin API");
            None
        }
    };
    // Workers first: the application keeps per-worker resources, one slot per worker.
    let workers = cachegate::runtime::Workers::start(
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    )?;
    let app = cachegate::app::App::new(cfg, Some(path))?;
    let running = cachegate::server::start_app(app.clone(), Some(workers)).await?;
    serve_until_stopped(&app, hup).await;
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Reload on SIGHUP; return on SIGTERM or SIGINT.
async fn serve_until_stopped(
    app: &cachegate::app::App,
    mut hup: Option<tokio::signal::unix::Signal>,
) {
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                // Problems are logged by the reload itself.
                let _ = app.reload().await;
            }
        }
    }
}

/// A thin client of `POST /purge` on the admin listener.
#[tokio::main(flavor = "current_thread")]
async fn purge(
    tags: Vec<String>,
    paths: Vec<String>,
    all: bool,
    admin: &str,
    token_env: &str,
) -> anyhow::Result<String> {
    use http_body_util::{BodyExt, Full};
    let token = std::env::var(token_env).map_err(|_| {
        anyhow::anyhow!("environment variable {token_env} (the admin token) is not set")
    })?;
    if tags.is_empty() && paths.is_empty() && !all {
        anyhow::bail!("name at least one --tag or --path, or --all");
    }
    let body = serde_json::json!({ "tags": tags, "paths": paths, "all": all }).to_string();
    let uri: http::Uri = format!("{}/purge", admin.trim_end_matches('/')).parse()?;
    let req = http::Request::post(uri)
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(bytes::Bytes::from(body)))?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let resp = tokio::time::timeout(std::time::Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| anyhow::anyhow!("{admin} did not answer within 10s"))??;
    let status = resp.status();
    let text = String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).into_owned();
    if !status.is_success() {
        anyhow::bail!("{status}: {text}");
    }
    Ok(text)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only SIGINT stops cachegate");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
