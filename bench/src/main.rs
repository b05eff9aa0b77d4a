//! pollgate-bench: the load generator behind docs/benchmarks.md. Drives
//! pollgate, Nchan or Pushpin with the same scenarios and prints one JSON
//! object per run. Built only with the `bench` feature
//! (`cargo build --release --features bench --bin pollgate-bench`).
//!
//! ```text
//! pollgate-bench --server pollgate --scenario fanout --subscribers 10000 \
//!     --channels 1 --messages 100 --pid $(pgrep -f 'pollgate serve')
//! ```
//!
//! - `fanout`: N subscribers over C channels, M messages per channel at an
//!   interval: publish→receive latency, deliveries/s, lost/duplicate/
//!   out-of-order counts, server CPU time per delivery.
//! - `hold`: N idle held polls: server RSS per held poll, idle server CPU.
//! - `churn`: a steady publish rate over many channels with continuous
//!   polling, for a duration: completeness and latency.
//! - `soak` (pollgate only): N held polls for a long duration with a steady
//!   publish rate; the server's RSS and open fds sampled all along, nothing
//!   lost (see `soak.rs` and `scripts/soak`).

mod adapters;
mod http;
mod proc;
mod secure;
mod soak;
mod watchers;

use adapters::{Payload, Position, Server};
use clap::{Parser, ValueEnum};
use serde_json::json;
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Scenario {
    Fanout,
    Hold,
    Churn,
    Soak,
    /// Watchers of one resource through a watch route (pollgate only).
    Watch,
}

#[derive(Parser, Debug)]
#[command(about = "Load generator for long-poll servers")]
struct Args {
    #[arg(long, value_enum)]
    server: Server,
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Subscriber address; several spread subscribers over instances.
    #[arg(long, default_value = "127.0.0.1:8080", num_args = 1..)]
    sub: Vec<SocketAddr>,
    /// Publish address (pollgate admin, Nchan itself, Pushpin control).
    #[arg(long, default_value = "127.0.0.1:9090")]
    publish: SocketAddr,
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Messages per channel (fanout).
    #[arg(long, default_value_t = 10)]
    messages: usize,
    /// Pause between publish rounds (fanout).
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Messages per second over all channels (churn).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Length of a churn run, or of the idle window of a hold run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Time to wait after all subscribers connected, before measuring.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Server process ids (their process trees are measured).
    #[arg(long)]
    pid: Vec<u32>,
    /// Loopback source addresses to spread connections over (127.0.0.1..).
    #[arg(long, default_value_t = 1)]
    sources: u8,
    /// Channel name prefix (make it unique per run).
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// Client worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// A name for this run, copied into the JSON (e.g. the scenario's row).
    #[arg(long, default_value = "")]
    label: String,
    /// Subscriber processes of a soak (each holds subscribers/shards polls).
    #[arg(long, default_value_t = 2)]
    shards: usize,
    /// Internal: run as subscriber process number SHARD of a soak.
    #[arg(long, hide = true)]
    shard: Option<usize>,
    /// How hold subscribers connect: plain HTTP/1.1, TLS, or HTTP/2 on TLS.
    #[arg(long, value_enum, default_value = "plain")]
    transport: secure::Transport,
    /// Held polls per HTTP/2 connection (`--transport h2`).
    #[arg(long, default_value_t = 100)]
    streams: usize,
    /// Where the watch scenario's legacy backend listens (pollgate's bench
    /// config has its `shop` upstream there).
    #[arg(long, default_value = "127.0.0.1:18099")]
    backend: SocketAddr,
    /// Watch scenario: poll the backend directly every `--interval` instead.
    #[arg(long)]
    direct: bool,
    /// New subscriber connections per second, at most.
    #[arg(long, default_value_t = 20000.0)]
    connect_rate: f64,
    /// Time between two samples of the server's RSS and fds (soak).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    sample: Duration,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// What one subscriber saw.
#[derive(Default)]
struct Seen {
    latencies_us: Vec<u32>,
    unique: usize,
    duplicates: usize,
    out_of_order: usize,
    errors: usize,
    channel: usize,
}

/// Follows one channel until `stop` turns true (or `want` messages arrived).
async fn subscriber(
    args: Arc<Args>,
    index: usize,
    ready: Arc<AtomicUsize>,
    want: usize,
    mut stop: watch::Receiver<bool>,
) -> Seen {
    let channel = index % args.channels;
    let name = format!("{}{}", args.prefix, channel);
    let source = (args.sources > 1).then(|| {
        IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            1 + (index % args.sources as usize) as u8,
        ))
    });
    let mut seen = Seen {
        channel,
        ..Seen::default()
    };
    let mut got: HashSet<u64> = HashSet::new();
    let mut last = None;
    let mut pos = Position::default();
    let mut counted = false;
    'connection: while !*stop.borrow() {
        // A channel's subscribers spread over every instance.
        let server = args.sub[(index / args.channels.max(1)) % args.sub.len()];
        let Ok(mut conn) = http::Conn::connect(server, source).await else {
            seen.errors += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        loop {
            let req = args.server.poll(&name, &pos);
            if !counted {
                counted = true;
                ready.fetch_add(1, Ordering::Relaxed);
            }
            let answer = tokio::select! {
                a = conn.exchange(&req) => a,
                _ = stop.changed() => break 'connection,
            };
            let Ok(answer) = answer else {
                seen.errors += 1;
                continue 'connection;
            };
            // When the answer reached this machine's socket, not when this
            // task got to it (see http.rs).
            let at = answer.received_ns;
            for Payload { seq, sent_ns } in args.server.read(&answer, &mut pos) {
                if !got.insert(seq) {
                    seen.duplicates += 1;
                    continue;
                }
                if last.is_some_and(|l| seq < l) {
                    seen.out_of_order += 1;
                }
                last = Some(seq);
                seen.unique += 1;
                seen.latencies_us
                    .push((at.saturating_sub(sent_ns) / 1000).min(u32::MAX as u64) as u32);
            }
            if want > 0 && seen.unique >= want {
                break 'connection;
            }
        }
    }
    seen
}

/// A publishing connection, reopened when the server closes it.
struct Publisher {
    addr: SocketAddr,
    conn: Option<http::Conn>,
}

impl Publisher {
    fn new(addr: SocketAddr) -> Publisher {
        Publisher { addr, conn: None }
    }

    /// Publishes message `seq` on `channel`; true on a 2xx.
    async fn publish(&mut self, args: &Args, channel: usize, seq: u64) -> bool {
        let body = format!("{{\"s\":{seq},\"t\":{}}}", now_ns());
        let req = args
            .server
            .publish(&format!("{}{}", args.prefix, channel), &body);
        for _ in 0..2 {
            if self.conn.is_none() {
                self.conn = http::Conn::connect(self.addr, None).await.ok();
            }
            let Some(conn) = self.conn.as_mut() else {
                continue;
            };
            match conn.exchange(&req).await {
                Ok(a) => {
                    if a.header("connection")
                        .is_some_and(|c| c.eq_ignore_ascii_case("close"))
                    {
                        self.conn = None;
                    }
                    return (200..300).contains(&a.status);
                }
                Err(_) => self.conn = None,
            }
        }
        false
    }
}

/// Publishes message `seq` on every channel, channels split over the
/// publishers (in parallel, one connection each). Returns per-channel success.
async fn publish_round(
    args: &Arc<Args>,
    publishers: &mut Vec<Publisher>,
    seq: u64,
) -> Vec<(usize, bool)> {
    let k = publishers.len();
    let mut set = tokio::task::JoinSet::new();
    for (g, mut p) in publishers.drain(..).enumerate() {
        let args = args.clone();
        set.spawn(async move {
            let mut done = Vec::new();
            for ch in (g..args.channels).step_by(k) {
                done.push((ch, p.publish(&args, ch, seq).await));
            }
            (p, done)
        });
    }
    let mut all = Vec::new();
    while let Some(Ok((p, done))) = set.join_next().await {
        publishers.push(p);
        all.extend(done);
    }
    all
}

/// Publishes at `--rate` over all channels, round robin, for `--duration`.
/// Returns the messages published per channel and the failed publishes.
async fn publish_steadily(args: &Args) -> (Vec<usize>, usize) {
    let mut published = vec![0usize; args.channels];
    let mut publish_errors = 0;
    let mut publisher = Publisher::new(args.publish);
    let gap = Duration::from_secs_f64(1.0 / args.rate.max(0.001));
    let end = Instant::now() + args.duration;
    let mut next = Instant::now();
    let mut seq = 0u64;
    while Instant::now() < end {
        let ch = (seq as usize) % args.channels;
        if publisher
            .publish(args, ch, seq / args.channels as u64)
            .await
        {
            published[ch] += 1;
        } else {
            publish_errors += 1;
        }
        seq += 1;
        next += gap;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }
    (published, publish_errors)
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Starts the subscribers numbered `indices` and waits until each has sent
/// its first poll.
async fn start_subscribers(
    args: &Arc<Args>,
    indices: impl Iterator<Item = usize>,
    want: usize,
    stop: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<Seen>> {
    let ready = Arc::new(AtomicUsize::new(0));
    let mut subs = Vec::new();
    for (n, i) in indices.enumerate() {
        subs.push(tokio::spawn(subscriber(
            args.clone(),
            i,
            ready.clone(),
            want,
            stop.clone(),
        )));
        if n % 500 == 499 {
            // At most `--connect-rate` new connections a second: a burst
            // of tens of thousands would overflow the listen backlog
            // (`net.core.somaxconn`) and wait on SYN retransmits.
            tokio::time::sleep(Duration::from_secs_f64(500.0 / args.connect_rate.max(1.0))).await;
        }
    }
    // A server that is not there (or refuses connections) ends the run
    // instead of keeping the subscribers retrying for ever.
    let deadline = Instant::now() + SUBSCRIBE_WITHIN;
    while ready.load(Ordering::Relaxed) < subs.len() {
        if Instant::now() > deadline {
            let connected = ready.load(Ordering::Relaxed);
            eprintln!(
                "pollgate-bench: only {connected} of {} subscribers connected to {:?} within {SUBSCRIBE_WITHIN:?}",
                subs.len(),
                args.sub
            );
            std::process::exit(1);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    subs
}

/// How long all subscribers of a run have to connect.
const SUBSCRIBE_WITHIN: Duration = Duration::from_secs(180);

/// What a set of subscribers saw, added up.
#[derive(Default)]
struct Totals {
    delivered: usize,
    lost: usize,
    duplicates: usize,
    out_of_order: usize,
    errors: usize,
    latencies_us: Vec<u32>,
}

impl Totals {
    /// Stops the subscribers and adds up what they saw, against the
    /// messages `published` per channel.
    async fn collect(
        subs: Vec<tokio::task::JoinHandle<Seen>>,
        stop: watch::Sender<bool>,
        published: &[usize],
    ) -> Totals {
        let _ = stop.send(true);
        let mut t = Totals::default();
        for s in subs {
            let seen = s.await.unwrap_or_default();
            t.delivered += seen.unique;
            t.lost += published[seen.channel].saturating_sub(seen.unique);
            t.duplicates += seen.duplicates;
            t.out_of_order += seen.out_of_order;
            t.errors += seen.errors;
            t.latencies_us.extend(seen.latencies_us);
        }
        t.latencies_us.sort_unstable();
        t
    }
}

async fn run(args: Arc<Args>) -> serde_json::Value {
    let (stop_tx, stop_rx) = watch::channel(false);
    let want = match args.scenario {
        Scenario::Fanout => args.messages,
        _ => 0,
    };
    let rss_before = proc::rss_bytes(&args.pid);
    let secure = args.scenario == Scenario::Hold && args.transport != secure::Transport::Plain;
    let (subs, held) = if secure {
        (Vec::new(), Some(secure::hold(&args, args.transport).await))
    } else {
        let subs = start_subscribers(&args, 0..args.subscribers, want, &stop_rx).await;
        (subs, None)
    };
    tokio::time::sleep(args.settle).await;

    let split_start = proc::cpu_split(&args.pid);
    let cpu_start = split_start.0 + split_start.1;
    let client_start = proc::cpu_seconds(&[std::process::id()]);
    let started = Instant::now();
    let mut published = vec![0usize; args.channels];
    let mut publish_errors = 0;
    let mut extra = json!({});
    match args.scenario {
        Scenario::Hold => {
            let rss_held = proc::rss_bytes(&args.pid);
            tokio::time::sleep(args.duration).await;
            let idle_cpu = proc::cpu_seconds(&args.pid) - cpu_start;
            let per_poll = rss_held.saturating_sub(rss_before) as f64 / args.subscribers as f64;
            extra = json!({
                "transport": format!("{:?}", args.transport).to_lowercase(),
                "held_sent": held.as_ref().map_or(args.subscribers, |h| h.sent),
                "rss_before": rss_before,
                "rss_held": rss_held,
                "rss_per_held_poll": per_poll.round(),
                "idle_cpu_percent": 100.0 * idle_cpu / args.duration.as_secs_f64(),
            });
        }
        Scenario::Fanout | Scenario::Churn | Scenario::Soak | Scenario::Watch => {
            if args.scenario == Scenario::Fanout {
                let mut publishers: Vec<Publisher> = (0..args.channels.min(8))
                    .map(|_| Publisher::new(args.publish))
                    .collect();
                for seq in 0..args.messages {
                    for (ch, ok) in publish_round(&args, &mut publishers, seq as u64).await {
                        if ok {
                            published[ch] += 1;
                        } else {
                            publish_errors += 1;
                        }
                    }
                    tokio::time::sleep(args.interval).await;
                }
            } else {
                (published, publish_errors) = publish_steadily(&args).await;
            }
        }
    }
    // Let the last deliveries land, then stop everyone.
    let grace = if args.scenario == Scenario::Hold {
        Duration::ZERO
    } else {
        Duration::from_secs(5)
    };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && subs.iter().any(|s| !s.is_finished()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let Totals {
        delivered,
        lost,
        duplicates: dups,
        out_of_order: ooo,
        errors,
        latencies_us: latencies,
    } = Totals::collect(subs, stop_tx, &published).await;
    let wall =
        started.elapsed().as_secs_f64() - grace.as_secs_f64().min(started.elapsed().as_secs_f64());
    let active = started.elapsed().as_secs_f64();
    let split_end = proc::cpu_split(&args.pid);
    let server_cpu = split_end.0 + split_end.1 - cpu_start;
    let per_delivery = |seconds: f64| {
        if delivered > 0 {
            1e6 * seconds / delivered as f64
        } else {
            0.0
        }
    };
    let client_cpu = proc::cpu_seconds(&[std::process::id()]) - client_start;
    let mut out = json!({
        "label": args.label,
        "server": args.server,
        "scenario": args.scenario,
        "subscribers": args.subscribers,
        "channels": args.channels,
        "messages_per_channel": args.messages,
        "interval_ms": args.interval.as_millis() as u64,
        "rate": args.rate,
        "published": published.iter().sum::<usize>(),
        "publish_errors": publish_errors,
        "delivered": delivered,
        "lost": lost,
        "duplicates": dups,
        "out_of_order": ooo,
        "errors": errors,
        "seconds": active,
        "deliveries_per_sec": if active > 0.0 { delivered as f64 / active.max(wall) } else { 0.0 },
        // One publish→receive sample per delivery.
        "latency_samples": latencies.len(),
        "latency_ms": {
            "p50": percentile(&latencies, 0.5) as f64 / 1000.0,
            "p90": percentile(&latencies, 0.9) as f64 / 1000.0,
            "p99": percentile(&latencies, 0.99) as f64 / 1000.0,
            "p999": percentile(&latencies, 0.999) as f64 / 1000.0,
            "max": latencies.last().copied().unwrap_or(0) as f64 / 1000.0,
        },
        "server_cpu_seconds": server_cpu,
        "server_cpu_us_per_delivery": per_delivery(server_cpu),
        // The same in user space and in the kernel (sends, receives, epoll).
        "server_user_us_per_delivery": per_delivery(split_end.0 - split_start.0),
        "server_kernel_us_per_delivery": per_delivery(split_end.1 - split_start.1),
        "client_cpu_percent": 100.0 * client_cpu / active.max(0.001),
        "rss_after": proc::rss_bytes(&args.pid),
    });
    if let (Some(o), Some(e)) = (out.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    out
}

fn main() {
    let args = Arc::new(Args::parse());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = match (args.scenario, args.shard) {
        (Scenario::Soak, Some(shard)) => runtime.block_on(soak::shard(args, shard)),
        (Scenario::Soak, None) => runtime.block_on(soak::run(args)),
        (Scenario::Watch, _) => runtime.block_on(watchers::run(args.clone(), args.direct)),
        _ => runtime.block_on(run(args)),
    };
    println!("{result}");
    // Held connections are dropped with the process.
    std::process::exit(0);
}
