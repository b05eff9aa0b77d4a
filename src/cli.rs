//! The command line (docs/configuration.md, "Command line"): `serve`, `check`, `publish`, `--version`.
//!
//! Every flag also reads `POLLGATE_<FLAG>` from the environment.

use crate::config::{Config, ConfigErrors};
use crate::routes::RouteTable;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The default config file, used when it exists and no -c is given.
pub const DEFAULT_CONFIG: &str = "conf/pollgate.yaml";

#[derive(Parser, Debug)]
#[command(name = "pollgate", version, about = "A long-poll gateway on Pingora")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    /// Validate a config file and print the effective config.
    Check(ConfigArgs),
    /// Publish one message through the publish API and print its id.
    Publish(PublishArgs),
}

/// Where the config comes from, and the flags that override it.
#[derive(Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// Config file (default: conf/pollgate.yaml when it exists, else built-in defaults).
    #[arg(short = 'c', long = "config", env = "POLLGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Client-facing listener, e.g. 0.0.0.0:8080.
    #[arg(long, env = "POLLGATE_LISTEN")]
    pub listen: Option<String>,
    /// Admin listener (publish API, metrics, health).
    #[arg(long, env = "POLLGATE_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Broker URL: memory://, redis://host:6379/0, ...
    #[arg(long, env = "POLLGATE_BROKER")]
    pub broker: Option<String>,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Log format.
    #[arg(long, env = "POLLGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log level or tracing filter (info, debug, pollgate=debug,pingora=warn).
    #[arg(long, env = "POLLGATE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Take over the listening sockets of the running instance (graceful
    /// upgrade: then send it SIGQUIT).
    #[arg(long, env = "POLLGATE_UPGRADE")]
    pub upgrade: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct PublishArgs {
    /// Admin base URL.
    #[arg(long, env = "POLLGATE_ADMIN", default_value = "http://127.0.0.1:9090")]
    pub admin: String,
    /// Bearer token of the publish API.
    #[arg(long, env = "POLLGATE_TOKEN")]
    pub token: Option<String>,
    /// Content type of the message.
    #[arg(
        long,
        env = "POLLGATE_CONTENT_TYPE",
        default_value = "text/plain; charset=utf-8"
    )]
    pub content_type: String,
    /// Channel to publish to.
    pub channel: String,
    /// The message; `-` or absent reads standard input.
    pub data: Option<String>,
}

/// The config file `args` names, and the name used in messages.
fn config_file(args: &ConfigArgs) -> Option<PathBuf> {
    match &args.config {
        Some(p) => Some(p.clone()),
        None => Path::new(DEFAULT_CONFIG)
            .exists()
            .then(|| PathBuf::from(DEFAULT_CONFIG)),
    }
}

/// Loads, overrides and checks the config, and compiles its routes. Errors
/// are full lines.
pub fn load(args: &ConfigArgs) -> Result<(Config, RouteTable), ConfigErrors> {
    let file = config_file(args);
    let name = file
        .as_ref()
        .map_or("(built-in defaults)".to_string(), |f| {
            f.display().to_string()
        });
    let mut config = match &file {
        Some(f) => Config::load(f)?,
        None => Config::default(),
    };
    if let Some(l) = &args.listen {
        config.listen = l.clone();
    }
    if let Some(a) = &args.admin_listen {
        config.admin_listen = a.clone();
    }
    if let Some(b) = &args.broker {
        config.broker.url = b.clone();
    }
    let routes = check(&config, &name)?;
    Ok((config, routes))
}

/// What `pollgate check` checks of `config` (named `file`): the config
/// ([`Config::validate`]), then its routes, compiled
/// ([`RouteTable::compile`]). Both are run, so that every problem is
/// listed, the config's first.
pub fn check(config: &Config, file: &str) -> Result<RouteTable, ConfigErrors> {
    match (config.validate(file), RouteTable::compile(config, file)) {
        (Ok(()), compiled) => compiled,
        (Err(problems), Ok(_)) => Err(problems),
        (Err(mut problems), Err(more)) => {
            problems.0.extend(more.0);
            Err(problems)
        }
    }
}

/// Why logging could not be set up (`serve` exits 2).
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// `--log-level` is not a level nor a tracing filter.
    #[error("--log-level '{level}': {why}")]
    Level {
        level: String,
        why: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber was already set.
    #[error("cannot set up logging: {0}")]
    Init(tracing_subscriber::util::TryInitError),
}

/// Sets up tracing, with Pingora's `log` records bridged in.
pub fn init_logging(format: LogFormat, level: &str) -> Result<(), LoggingError> {
    use tracing_subscriber::util::SubscriberInitExt;
    let mut filter =
        tracing_subscriber::EnvFilter::try_new(level).map_err(|why| LoggingError::Level {
            level: level.into(),
            why,
        })?;
    // pingora-load-balancing logs each change of an upstream address's health,
    // as upstream.rs does with the upstream's name: its own lines only on request.
    if !level.contains("pingora_load_balancing") {
        if let Ok(quiet) = "pingora_load_balancing=error".parse() {
            filter = filter.add_directive(quiet);
        }
    }
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.finish().try_init(),
        LogFormat::Json => builder.json().finish().try_init(),
    };
    result.map_err(LoggingError::Init)
}

/// Why `pollgate publish` failed (printed after `pollgate publish: `).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot read stdin: {0}")]
    Stdin(std::io::Error),
    #[error("--admin '{0}': only http:// and https:// URLs are supported")]
    NotHttp(String),
    /// The publish API could not be asked.
    #[error("cannot publish to {base}: {why}")]
    Unreachable { base: String, why: ureq::Error },
    /// The publish API's answer was not a 200 with an id: its status, its
    /// `error` and its `detail` (or its body).
    #[error("publish failed: {status} {error} {detail}")]
    Refused {
        status: u16,
        error: String,
        detail: String,
    },
}

/// Publishes through the admin API; returns the id to print.
pub fn publish(args: &PublishArgs) -> Result<String, PublishError> {
    let data = match args.data.as_deref() {
        Some("-") | None => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(PublishError::Stdin)?;
            buf
        }
        Some(d) => d.as_bytes().to_vec(),
    };
    let base = args.admin.trim_end_matches('/');
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err(PublishError::NotHttp(args.admin.clone()));
    }
    let channel: String = args
        .channel
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' | b':' | b'@' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(30)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = agent
        .post(format!("{base}/v1/publish/{channel}"))
        .header("Content-Type", &args.content_type);
    if let Some(t) = args.token.as_deref().filter(|t| !t.is_empty()) {
        request = request.header("Authorization", format!("Bearer {t}"));
    }
    let mut answer = request
        .send(&data[..])
        .map_err(|why| PublishError::Unreachable {
            base: base.into(),
            why,
        })?;
    let status = answer.status().as_u16();
    let body = answer.body_mut().read_to_string().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(body.trim()).unwrap_or(serde_json::Value::Null);
    match (status, v["id"].as_str()) {
        (200, Some(id)) => Ok(id.to_string()),
        _ => Err(PublishError::Refused {
            status,
            error: v["error"].as_str().unwrap_or("").into(),
            detail: v["detail"].as_str().unwrap_or(body.trim()).into(),
        }),
    }
}
