//! `--scenario soak` (pollgate only): many held polls against one server for
//! a long time with a steady publish rate, checking that the server's
//! memory and open file descriptors stay flat and that every subscriber
//! gets every message. `scripts/soak` runs it; docs/reliability.md keeps
//! the last result.
//!
//! The subscribers run in `--shards` child processes (this binary again,
//! with `--shard i`), so that no client process nears the open-files
//! limit. This process waits until the server holds every poll (its
//! `pollgate_held_requests`), publishes at `--rate` for `--duration`,
//! samples the server's RSS, fds and held polls every `--sample`, and adds
//! up what the shards saw. A shard speaks one JSON line each way: it prints
//! `{"ready": n}` once its n subscribers have polled, reads
//! `{"published": [per channel]}` when publishing is over, waits 5 s for the
//! last deliveries and prints its totals.

use crate::{http, proc, publish_steadily, start_subscribers, Args, Totals};
use serde_json::{json, Value};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::watch;

/// Largest RSS growth, first sample to last, still called flat.
const RSS_SLACK: f64 = 0.10;
/// Largest change in open fds, first sample to last, still called flat.
const FD_SLACK: i64 = 50;
/// How long a shard waits for the last deliveries.
const GRACE: Duration = Duration::from_secs(5);

/// One subscriber process.
struct Shard {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Shard {
    fn spawn(i: usize) -> Shard {
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .args(std::env::args_os().skip(1))
            .args(["--shard", &i.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start a shard");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        Shard {
            child,
            stdin,
            stdout,
        }
    }

    async fn read(&mut self) -> Value {
        let line = self.stdout.next_line().await.ok().flatten();
        let line = line.expect("a shard ended early (see its error above)");
        serde_json::from_str(&line).expect("a shard's JSON line")
    }
}

/// One reading of the server.
#[derive(serde::Serialize)]
struct Sample {
    /// Seconds since publishing started.
    t: u64,
    rss_mb: f64,
    fds: usize,
    /// `pollgate_held_requests`, when /metrics answered.
    held: Option<u64>,
}

/// `pollgate_held_requests` from the admin listener's /metrics.
async fn held_polls(admin: std::net::SocketAddr) -> Option<u64> {
    let mut conn = http::Conn::connect(admin, None).await.ok()?;
    let req = http::request("GET", "/metrics", &[], b"");
    let answer = conn.exchange(&req).await.ok()?;
    let text = String::from_utf8_lossy(&answer.body);
    text.lines()
        .find_map(|l| l.strip_prefix("pollgate_held_requests "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

async fn sample(args: &Args, started: Instant) -> Sample {
    let s = Sample {
        t: started.elapsed().as_secs(),
        rss_mb: proc::rss_bytes(&args.pid) as f64 / 1048576.0,
        fds: proc::open_fds(&args.pid),
        held: held_polls(args.publish).await,
    };
    eprintln!(
        "soak: t={:>4}s rss={:>7.1} MB fds={:>6} held={}",
        s.t,
        s.rss_mb,
        s.fds,
        s.held.map_or("?".into(), |h| h.to_string())
    );
    s
}

/// The soak's coordinator: shards, publishing, samples, summary.
pub async fn run(args: Arc<Args>) -> Value {
    let mut shards: Vec<Shard> = (0..args.shards.max(1)).map(Shard::spawn).collect();
    let mut ready = 0;
    for s in &mut shards {
        ready += s.read().await["ready"].as_u64().unwrap_or(0);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let held_at_start = loop {
        let held = held_polls(args.publish).await.unwrap_or(0);
        if held >= args.subscribers as u64 || Instant::now() > deadline {
            break held;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("soak: {ready} subscribers polled, {held_at_start} held; publishing");

    let started = Instant::now();
    let (stop, mut stopped) = watch::channel(false);
    let sampler = {
        let args = args.clone();
        tokio::spawn(async move {
            let mut samples = vec![sample(&args, started).await];
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(args.sample) => {}
                    _ = stopped.changed() => break,
                }
                samples.push(sample(&args, started).await);
            }
            samples.push(sample(&args, started).await);
            samples
        })
    };
    let (published, publish_errors) = publish_steadily(&args).await;
    let _ = stop.send(true);
    let samples = sampler.await.unwrap();

    let line = format!("{}\n", json!({ "published": published }));
    for s in &mut shards {
        let _ = s.stdin.write_all(line.as_bytes()).await;
    }
    let mut seen = json!({});
    for key in ["delivered", "lost", "duplicates", "out_of_order", "errors"] {
        seen[key] = json!(0);
    }
    let mut p99_ms: f64 = 0.0;
    for s in &mut shards {
        let v = s.read().await;
        for key in ["delivered", "lost", "duplicates", "out_of_order", "errors"] {
            seen[key] = json!(seen[key].as_u64().unwrap() + v[key].as_u64().unwrap_or(0));
        }
        p99_ms = p99_ms.max(v["p99_ms"].as_f64().unwrap_or(0.0));
        let _ = s.child.wait().await;
    }
    summary(
        &args,
        &published,
        publish_errors,
        held_at_start,
        seen,
        p99_ms,
        &samples,
    )
}

fn summary(
    args: &Args,
    published: &[usize],
    publish_errors: usize,
    held_at_start: u64,
    seen: Value,
    p99_ms: f64,
    samples: &[Sample],
) -> Value {
    let expected: usize = (0..args.subscribers)
        .map(|i| published[i % args.channels])
        .sum();
    let (first, last) = (&samples[0], &samples[samples.len() - 1]);
    let rss_max = samples.iter().map(|s| s.rss_mb).fold(0.0, f64::max);
    let fds_max = samples.iter().map(|s| s.fds).max().unwrap_or(0);
    let rss_growth = (last.rss_mb - first.rss_mb) / first.rss_mb.max(1.0);
    let fd_change = last.fds as i64 - first.fds as i64;
    let flat = rss_growth <= RSS_SLACK && fd_change.abs() <= FD_SLACK;
    let complete = seen["lost"] == 0 && seen["duplicates"] == 0 && publish_errors == 0;
    let all_held = held_at_start >= args.subscribers as u64;
    let ok = flat && complete && all_held;
    eprintln!(
        "soak: {} held polls ({} shards), {:.1} min, {} published ({} failed), \
         delivered {} of {}, lost {}, duplicates {}, poll errors {}\n\
         soak: server RSS {:.1} MB -> {:.1} MB (max {:.1}, {:+.1}%), fds {} -> {} (max {})\n\
         soak: {}",
        held_at_start,
        args.shards,
        args.duration.as_secs_f64() / 60.0,
        published.iter().sum::<usize>(),
        publish_errors,
        seen["delivered"],
        expected,
        seen["lost"],
        seen["duplicates"],
        seen["errors"],
        first.rss_mb,
        last.rss_mb,
        rss_max,
        100.0 * rss_growth,
        first.fds,
        last.fds,
        fds_max,
        if ok { "ok" } else { "FAILED" }
    );
    json!({
        "label": args.label,
        "scenario": "soak",
        "subscribers": args.subscribers,
        "held_at_start": held_at_start,
        "shards": args.shards,
        "channels": args.channels,
        "rate": args.rate,
        "seconds": args.duration.as_secs(),
        "published": published.iter().sum::<usize>(),
        "publish_errors": publish_errors,
        "expected_deliveries": expected,
        "delivered": seen["delivered"],
        "lost": seen["lost"],
        "duplicates": seen["duplicates"],
        "out_of_order": seen["out_of_order"],
        "errors": seen["errors"],
        "latency_p99_ms_worst_shard": p99_ms,
        "rss_mb": {"first": first.rss_mb, "last": last.rss_mb, "max": rss_max, "growth": rss_growth},
        "fds": {"first": first.fds, "last": last.fds, "max": fds_max},
        "samples": samples,
        "flat": flat,
        "complete": complete,
        "ok": ok,
    })
}

/// A subscriber process of the soak: its share of the subscribers.
pub async fn shard(args: Arc<Args>, i: usize) -> Value {
    let (stop, stopped) = watch::channel(false);
    let mine = (i..args.subscribers).step_by(args.shards.max(1));
    let subs = start_subscribers(&args, mine, 0, &stopped).await;
    println!("{}", json!({ "ready": subs.len() }));
    let mut line = String::new();
    let _ = BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await;
    let published: Vec<usize> = serde_json::from_str::<Value>(&line)
        .ok()
        .and_then(|v| serde_json::from_value(v["published"].clone()).ok())
        .unwrap_or_else(|| vec![0; args.channels]);
    tokio::time::sleep(GRACE).await;
    let t = Totals::collect(subs, stop, &published).await;
    json!({
        "delivered": t.delivered,
        "lost": t.lost,
        "duplicates": t.duplicates,
        "out_of_order": t.out_of_order,
        "errors": t.errors,
        "p99_ms": crate::percentile(&t.latencies_us, 0.99) as f64 / 1000.0,
    })
}
