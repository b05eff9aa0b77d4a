//! A small run of the benchmark harness (pollgate-bench) against a real
//! pollgate, so that the harness keeps working; the full comparison is
//! `bench/compare.sh` (docs/benchmarks.md); the soak is `scripts/soak`
//! (docs/reliability.md).

mod support;

use serde_json::Value;
use std::process::Command;
use support::*;

fn bench(pg: &Pollgate, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_pollgate-bench"))
        .args([
            "--server", "pollgate", "--settle", "300ms", "--prefix", "smoke",
        ])
        .args(["--sub", &format!("127.0.0.1:{}", pg.port)])
        .args(["--publish", &format!("127.0.0.1:{}", pg.admin_port)])
        .args(["--pid", &pg.pid().to_string()])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A figure of the bench's JSON as a number (panics when it is not one).
fn number(v: &Value, path: &[&str]) -> f64 {
    let mut at = v;
    for key in path {
        at = &at[key];
    }
    at.as_f64()
        .unwrap_or_else(|| panic!("{} is not a number in {v}", path.join(".")))
}

/// The fanout's figures are measured, not just printed: the deliveries the
/// bench counted are those the server counted (`pollgate_messages_delivered_total`),
/// one latency sample each, every latency positive and below the run's own
/// length, and the server's CPU time per delivery positive and finite (a
/// wrong process, or none, measures 0).
#[tokio::test]
async fn fanout_smoke_delivers_everything_once_and_in_order() {
    const DELIVERED: &str = "pollgate_messages_delivered_total";
    let pg = Pollgate::start(ROUTES);
    let delivered_before = pg.metric(DELIVERED).await;
    // Blocks this test's runtime for the run: nothing else runs on it.
    let v = bench(
        &pg,
        &[
            "--scenario",
            "fanout",
            "--subscribers",
            "200",
            "--channels",
            "2",
            "--messages",
            "10",
            "--interval",
            "20ms",
        ],
    );
    assert_eq!(v["published"], 20);
    assert_eq!(v["delivered"], 2000, "{v}");
    assert_eq!(v["lost"], 0);
    assert_eq!(v["duplicates"], 0);
    assert_eq!(v["out_of_order"], 0);
    assert_eq!(
        (v["publish_errors"].as_u64(), v["errors"].as_u64()),
        (Some(0), Some(0)),
        "{v}"
    );
    // Counted by each poll's task once its answer is out: the client may
    // read the last answers a moment before they are counted.
    let mut server_delivered = 0.0;
    for _ in 0..50 {
        server_delivered = pg.metric(DELIVERED).await - delivered_before;
        if server_delivered >= 2000.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(server_delivered, 2000.0, "as the server counts: {v}");
    assert_eq!(v["latency_samples"], 2000, "one sample per delivery: {v}");
    let latency = |p: &str| number(&v, &["latency_ms", p]);
    let (p50, p99, max) = (latency("p50"), latency("p99"), latency("max"));
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{v}");
    assert!(max < 1000.0 * number(&v, &["seconds"]), "{v}");
    assert!(number(&v, &["server_cpu_seconds"]) > 0.0, "{v}");
    let per_delivery = number(&v, &["server_cpu_us_per_delivery"]);
    assert!(per_delivery > 0.0 && per_delivery.is_finite(), "{v}");
}

#[test]
fn hold_smoke_measures_memory_per_held_poll() {
    let pg = Pollgate::start(ROUTES);
    let v = bench(
        &pg,
        &[
            "--scenario",
            "hold",
            "--subscribers",
            "100",
            "--duration",
            "1s",
        ],
    );
    assert!(
        v["rss_held"].as_u64().unwrap() >= v["rss_before"].as_u64().unwrap(),
        "{v}"
    );
    assert_eq!(v["subscribers"], 100);
}

#[test]
fn soak_smoke_samples_the_server_and_loses_nothing() {
    let pg = Pollgate::start(ROUTES);
    let v = bench(
        &pg,
        &[
            "--scenario",
            "soak",
            "--subscribers",
            "200",
            "--shards",
            "2",
            "--channels",
            "4",
            "--rate",
            "40",
            "--duration",
            "3s",
            "--sample",
            "1s",
        ],
    );
    assert_eq!(v["held_at_start"], 200, "{v}");
    assert!(v["published"].as_u64().unwrap() > 100, "{v}");
    assert_eq!(v["delivered"], v["expected_deliveries"], "{v}");
    assert_eq!(v["lost"], 0);
    assert_eq!(v["duplicates"], 0);
    assert!(v["samples"].as_array().unwrap().len() >= 3, "{v}");
    assert!(v["fds"]["first"].as_u64().unwrap() >= 200, "{v}");
}
