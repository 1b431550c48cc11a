//! `tribunal run`: one instance. The flags, checked together, become a [`NodeConfig`].

use std::process::ExitCode;

use anyhow::Context;

use super::{federation_args, KafkaArgs};
use crate::gateway;
use crate::node::{self, cores};

#[derive(clap::Args)]
pub struct RunArgs {
    /// The input log: `local:DIR` (the embedded log) or `kafka:HOST:PORT[,HOST:PORT..]`.
    #[arg(long)]
    log: String,
    #[command(flatten)]
    kafka: KafkaArgs,
    /// This instance's id in the federation: unique among --peers; the lowest ready,
    /// healthy id publishes.
    #[arg(long, default_value_t = 1)]
    instance_id: u32,
    /// Whether this instance may take the publisher role: certified outputs go to the
    /// outputs topic (Kafka) or to the `outputs` log in the local log's directory.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    publish: bool,
    #[command(flatten)]
    federation: federation_args::FederationArgs,
    /// Where the Ledger and status live.
    #[arg(long)]
    data_dir: std::path::PathBuf,
    /// Cores to pin one shard each to, e.g. `0,1` or `0-3`; default: every allowed core.
    #[arg(long)]
    cores: Option<String>,
    /// Exit once every record in the log is durable (for jobs and tests).
    #[arg(long)]
    stop_at_end: bool,
    /// Idempotency TTL in stream-time milliseconds.
    #[arg(long, default_value_t = tribunal_shards::warden::WardenConfig::default().ttl_ms)]
    ttl_ms: u64,
    /// Take a snapshot of a partition every this many of its records, so that recovery
    /// replays at most that many from the Ledger; older segments are deleted (0: never).
    #[arg(long, default_value_t = 1_000_000)]
    snapshot_every: u64,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// A TOML file of settings, keyed by the flags' long names (`data-dir = "/data"`).
    /// Flags win over TRIBUNAL_* variables, which win over the file.
    #[arg(long, value_name = "FILE")]
    #[allow(dead_code)] // read by cli::config, before clap parses the rest
    config: Option<std::path::PathBuf>,
    #[command(flatten)]
    http: HttpArgs,
}

/// The REST API (the Gateway): off unless --http is given.
#[derive(clap::Args)]
struct HttpArgs {
    /// Serve the REST API here, e.g. `127.0.0.1:8080`; every shard accepts on it.
    #[arg(long)]
    http: Option<std::net::SocketAddr>,
    /// How long a movement waits for its certified output before 504 (safe to retry).
    #[arg(long, default_value_t = gateway::DEFAULT_DEADLINE_MS)]
    http_deadline_ms: u64,
    /// Largest request body accepted (413 past it).
    #[arg(long, default_value_t = gateway::DEFAULT_MAX_BODY_BYTES)]
    http_max_body_bytes: usize,
    /// A request must arrive whole within this long of its first byte (408 past it).
    #[arg(long, default_value_t = gateway::DEFAULT_READ_TIMEOUT_MS)]
    http_read_timeout_ms: u64,
    /// Close keep-alive connections idle this long.
    #[arg(long, default_value_t = gateway::DEFAULT_IDLE_TIMEOUT_MS)]
    http_idle_timeout_ms: u64,
    /// Movements appending or waiting for certification at once (503 overloaded past it).
    #[arg(long, default_value_t = gateway::certified_view::DEFAULT_MAX_WAITING)]
    http_max_waiting: usize,
    /// File holding the bearer token of the admin endpoints (or set TRIBUNAL_ADMIN_TOKEN);
    /// without one they do not exist.
    #[arg(long)]
    admin_token_file: Option<std::path::PathBuf>,
}

impl HttpArgs {
    fn config(&self) -> anyhow::Result<Option<gateway::GatewayConfig>> {
        let Some(listen) = self.http else { return Ok(None) };
        anyhow::ensure!(self.http_deadline_ms > 0, "--http-deadline-ms must be positive");
        anyhow::ensure!(self.http_max_body_bytes >= 1024, "--http-max-body-bytes must be at least 1024");
        anyhow::ensure!(self.http_read_timeout_ms > 0, "--http-read-timeout-ms must be positive");
        anyhow::ensure!(self.http_idle_timeout_ms > 0, "--http-idle-timeout-ms must be positive");
        anyhow::ensure!(self.http_max_waiting > 0, "--http-max-waiting must be positive");
        let token = match (&self.admin_token_file, std::env::var("TRIBUNAL_ADMIN_TOKEN")) {
            (Some(path), _) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the admin token {}", path.display()))?;
                Some(text.trim().to_owned())
            }
            (None, Ok(token)) => Some(token.trim().to_owned()),
            (None, Err(_)) => None,
        };
        if let Some(token) = &token {
            anyhow::ensure!(token.len() >= 16, "the admin token must have at least 16 characters");
        }
        Ok(Some(gateway::GatewayConfig {
            deadline_ms: self.http_deadline_ms,
            max_body_bytes: self.http_max_body_bytes,
            read_timeout_ms: self.http_read_timeout_ms,
            idle_timeout_ms: self.http_idle_timeout_ms,
            max_waiting: self.http_max_waiting,
            admin_token: token,
            ..gateway::GatewayConfig::new(listen)
        }))
    }
}

pub fn run_node(args: RunArgs) -> anyhow::Result<ExitCode> {
    // A peer that goes away mid-write must be an error on that link, not the end of
    // this process: ignore SIGPIPE (set to default in main for the printing commands).
    // SAFETY: setting a signal disposition before any thread of the node starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    // A panic on any thread (a shard's executor, the Clerk's, a Kafka thread) ends the
    // process, rather than leaving the others waiting on a dead shard for ever: the
    // instance is crash-only, and a restart recovers it (a supervisor restarts it).
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
    let subscriber = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    );
    if args.log_json {
        subscriber.json().init();
    } else {
        subscriber.init();
    }
    // spec: Configuration.EffectiveConfigurationLogged
    tracing::info!(settings = %super::config::describe(super::config::effective()), "effective configuration");
    let log = match args.log.strip_prefix("local:") {
        Some(dir) if !dir.is_empty() => node::LogSource::Local(dir.into()),
        _ => node::LogSource::Kafka(args.kafka.config(&args.log)?),
    };
    anyhow::ensure!(args.ttl_ms > 0, "--ttl-ms must be positive");
    let cores = cores::select(args.cores.as_deref())?;
    let federation = federation_config(args.instance_id, &args.federation)?;
    node::run(node::NodeConfig {
        log,
        instance_id: args.instance_id,
        publish: args.publish,
        federation,
        data_dir: args.data_dir,
        cores,
        warden: tribunal_shards::warden::WardenConfig { ttl_ms: args.ttl_ms, ..Default::default() },
        stop_at_end: args.stop_at_end,
        snapshot_every: args.snapshot_every,
        gateway: args.http.config()?,
    })
}

/// Checks the federation options together: clear errors before anything starts.
fn federation_config(
    instance_id: u32,
    args: &federation_args::FederationArgs,
) -> anyhow::Result<node::FederationConfig> {
    let peers = args.peers.iter().map(|p| federation_args::parse_peer(p)).collect::<anyhow::Result<Vec<_>>>()?;
    let mut ids: Vec<u32> = peers.iter().map(|p| p.instance_id).collect();
    ids.sort_unstable();
    ids.dedup();
    anyhow::ensure!(ids.len() == peers.len(), "--peers lists an instance id twice");
    anyhow::ensure!(!ids.contains(&instance_id), "--peers lists this instance's own id {instance_id}");
    let instances = peers.len() as u32 + 1;
    anyhow::ensure!(
        (1..=instances).contains(&args.expected_copies),
        "--expected-copies {} needs that many instances, and this federation has {instances} (itself and {} \
         peers); run a standalone instance with --expected-copies 1",
        args.expected_copies,
        peers.len()
    );
    let psk = match (&args.psk_file, peers.is_empty()) {
        (Some(path), false) => Some(federation_args::read_psk(path)?),
        (None, false) => anyhow::bail!("--peers needs --psk-file (the federation's pre-shared key)"),
        (_, true) => None,
    };
    anyhow::ensure!(
        peers.is_empty() || args.listen.is_some(),
        "--peers needs --listen (where this instance accepts peers)"
    );
    let faults =
        args.inject_fault.iter().map(|f| federation_args::parse_fault(f)).collect::<anyhow::Result<Vec<_>>>()?;
    Ok(node::FederationConfig { listen: args.listen, peers, psk, expected_copies: args.expected_copies, faults })
}
