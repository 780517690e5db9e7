//! `dataplane`: the node agent's command line.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use dataplane::{
    app::{Agent, AgentError, watch},
    config::{Config, EXIT_BAD_CONFIG, ValidConfig},
};
use tracing::{error, info};

#[derive(Parser)]
#[command(name = "dataplane", version, about = "eBPF-steered node routing dataplane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: load the eBPF programs, steer routed connects, serve flows.
    Agent {
        /// YAML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// How often to check the file for changes (SIGHUP reloads at once).
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        reload_interval: Duration,
    },
    /// Validate a configuration file and exit (0 valid, 64 invalid).
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Remove what a pinned agent leaves on the node: its pinned programs and
    /// maps (routed connects are then neither steered nor refused) and the
    /// redirect interface. Stop the agent first.
    Uninstall {
        /// The agent's configuration file (its cgroup, pin_dir and interface).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Create the tunnel's private CA and node certificates.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Show a running agent's peers, routes, connections and flows.
    Status {
        /// The agent's admin address (its `admin:` setting).
        #[arg(long, default_value = "127.0.0.1:9464")]
        admin: std::net::SocketAddr,
        /// Print the JSON the agent returns instead of tables.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Create a CA: writes ca.crt and ca.key into --out.
    Ca {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "dataplane CA")]
        name: String,
        #[arg(long, default_value_t = 3650)]
        days: u64,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a node certificate signed by the CA in --ca: writes tls.crt,
    /// tls.key and ca.crt into --out.
    Issue {
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        ca: PathBuf,
        /// The node's identity, a URI SAN (e.g. spiffe://example.org/node/worker-1).
        #[arg(long)]
        identity: String,
        #[arg(long)]
        out: PathBuf,
        /// Extra DNS SANs.
        #[arg(long)]
        dns: Vec<String>,
        /// Extra IP SANs.
        #[arg(long)]
        ip: Vec<std::net::IpAddr>,
        #[arg(long, default_value_t = 365)]
        days: u64,
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                println!("{}: valid ({} routes)", config.display(), c.routes.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_BAD_CONFIG as u8)
            }
        },
        Command::Agent { config, reload_interval } => run_agent(config, reload_interval),
        Command::Cert(cmd) => cert(cmd),
        Command::Uninstall { config } => uninstall(&config),
        Command::Status { admin, json } => match dataplane::admin::client::fetch(admin) {
            Ok((status, raw)) => {
                print!("{}", if json { raw } else { dataplane::admin::client::render(&status) });
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("dataplane status: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn uninstall(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
    };
    match dataplane::app::uninstall(&config) {
        Ok(removed) if removed.is_empty() => {
            println!("nothing to remove");
            ExitCode::SUCCESS
        }
        Ok(removed) => {
            for r in removed {
                println!("removed {r}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dataplane uninstall: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cert(cmd: CertCommand) -> ExitCode {
    let day = Duration::from_secs(86_400);
    let days = match &cmd {
        CertCommand::Ca { days, .. } | CertCommand::Issue { days, .. } => *days,
    };
    // A certificate valid for no time (or beyond what u32 days hold) is a typo.
    if !(1..=36_500).contains(&days) {
        eprintln!("dataplane cert: --days {days}: must be between 1 and 36500");
        return ExitCode::from(EXIT_BAD_CONFIG as u8);
    }
    let result = match cmd {
        CertCommand::Ca { out, name, days, force } => {
            dataplane::tls::certs::write_ca(&out, &name, day * days as u32, force)
                .map(|()| format!("{}/ca.crt", out.display()))
        }
        CertCommand::Issue { ca, identity, out, dns, ip, days, force } => {
            let spec = dataplane::tls::certs::NodeSpec {
                identity,
                dns,
                ips: ip,
                validity: day * days as u32,
                ..Default::default()
            };
            dataplane::tls::certs::write_node(&ca, &spec, &out, force)
                .map(|()| format!("{}/tls.crt", out.display()))
        }
    };
    match result {
        Ok(path) => {
            println!("wrote {path}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dataplane cert: {e}");
            ExitCode::from(EXIT_BAD_CONFIG as u8)
        }
    }
}

/// A proxy holds two descriptors per flow: lift the soft limit to the hard one.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: lim is a valid rlimit for both calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn run_agent(path: PathBuf, reload_interval: Duration) -> ExitCode {
    raise_nofile_limit();
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
    };
    init_logging(&config.log);
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let workers = config.worker_threads(cpus);
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                error!("starting the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
    info!(workers, cpus, "runtime started");
    match runtime.block_on(serve(path, config, reload_interval)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            let bad_config =
                e.downcast_ref::<AgentError>().is_some_and(|e| matches!(e, AgentError::Config(_)));
            ExitCode::from(if bad_config { EXIT_BAD_CONFIG as u8 } else { 1 })
        }
    }
}

async fn serve(path: PathBuf, config: ValidConfig, reload_interval: Duration) -> anyhow::Result<()> {
    let agent = Agent::start(config).await?;
    let handle = agent.handle();
    info!(listeners = ?agent.listen_addrs(), admin = ?agent.admin_addr(), cgroup = ?handle.cgroup(), "agent running");
    let watcher = tokio::spawn(watch::watch(path, handle, reload_interval));
    agent.run(shutdown_signal()).await;
    watcher.abort();
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        error!("cannot install signal handlers; stopping");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
}

/// Text on a terminal, JSON on request (`log.format: json` or
/// DATAPLANE_LOG_FORMAT=json); level from DATAPLANE_LOG, else `log.level`.
fn init_logging(settings: &dataplane::config::LogSettings) {
    use std::io::IsTerminal;

    use dataplane::config::LogFormat;
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_env("DATAPLANE_LOG").unwrap_or_else(|_| EnvFilter::new(&settings.level));
    // aya's loader logs every relocation at debug: keep it at warn unless asked.
    let filter = filter.add_directive("aya=warn".parse().expect("static directive"));
    let filter = filter.add_directive("aya_obj=warn".parse().expect("static directive"));
    let format = match std::env::var("DATAPLANE_LOG_FORMAT").as_deref() {
        Ok("json") => LogFormat::Json,
        Ok("text") => LogFormat::Text,
        _ => settings.format,
    };
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).try_init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
    };
}
