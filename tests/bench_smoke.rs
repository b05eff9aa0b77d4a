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

#[test]
fn fanout_smoke_delivers_everything_once_and_in_order() {
    let pg = Pollgate::start(ROUTES);
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
    assert!(v["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    assert!(v["server_cpu_seconds"].as_f64().unwrap() >= 0.0);
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
