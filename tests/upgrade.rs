//! The graceful upgrade (docs/api.md, "Lifecycle"): `pollgate serve
//! --upgrade` beside a running instance, then SIGQUIT to the old one, with
//! two real processes on one Redis. Clients opening new connections all the
//! while, on the plain, TLS and admin listeners, see no refusal; a poll held on the old process is answered with its
//! cursor and misses nothing on the new one; an address new in the upgrade
//! is bound afresh. Also the listener's own settings: the per-connection
//! request limit.

mod support;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::pki::{install, pki, trusting};
use support::redis::RedisServer;
use support::*;

/// A process killed when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `pollgate serve --upgrade` on `old`'s config (with `args` added),
/// waiting for `old`'s sockets.
fn upgrade(old: &Pollgate, args: &[&str]) -> KillOnDrop {
    let child = Command::new(env!("CARGO_BIN_EXE_pollgate"))
        .args(["serve", "-c", old.config.to_str().unwrap(), "--upgrade"])
        .args(args)
        .args(["--log-level", "warn"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    KillOnDrop(child)
}

/// Opens a new connection per request to `url` until `stop`; counts
/// answers and failures: a refused or reset connection, or any status but
/// 200 (a draining instance answers, it does not refuse).
fn hammer(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    hammer_with(fresh, url, None, stop)
}

/// [`hammer`] with a client of one's own (which must not pool
/// connections), and a text every answer must hold when `expect` is set.
fn hammer_with(
    fresh: reqwest::Client,
    url: String,
    expect: Option<String>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    tokio::spawn(async move {
        let (mut ok, mut failures) = (0, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            match fresh.get(&url).send().await {
                Ok(r) if r.status() == 200 => match &expect {
                    Some(want) if !r.text().await.is_ok_and(|t| t.contains(want.as_str())) => {
                        failures.push(format!("an answer without {want}"))
                    }
                    _ => ok += 1,
                },
                Ok(r) => {
                    let status = r.status();
                    let body = r.text().await.unwrap_or_default();
                    failures.push(format!("status {status}: {body}"))
                }
                Err(e) => failures.push(format!("{e:?}")),
            }
        }
        (ok, failures)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigquit_hands_the_sockets_to_the_new_process_and_nothing_is_refused_or_lost() {
    let redis = RedisServer::start();
    let sock = std::env::temp_dir().join(format!("pollgate-upgrade-{}.sock", std::process::id()));
    let pki = pki();
    let (cert, key) = (temp_file("up.crt", ""), temp_file("up.key", ""));
    install(&pki, &cert, &key);
    let tls_port = free_port();
    let body = with_broker(
        &format!(
            "upgrade_sock: \"{}\"\ntls:\n  listen: \"127.0.0.1:{tls_port}\"\n  cert: \"{}\"\n  key: \"{}\"\n{ROUTES}",
            sock.display(),
            cert.display(),
            key.display()
        ),
        &redis.url(),
    );
    let mut old = Pollgate::start(&body);
    old.wait_ready();
    let before = old.publish("up", "text/plain", "before").await;
    let url = old.url(&format!("/sub/up?cursor={before}&timeout=30"));
    let held = tokio::spawn(async move { get_json(&url).await });
    old.wait_metric("pollgate_held_requests", 1.0).await;

    // Clients re-polling with a cursor whose next message is stored: every
    // answer, from either process, must carry that message.
    let seen = old.publish("busy", "text/plain", "seen").await;
    let next = old.publish("busy", "text/plain", "next").await;
    let stop = Arc::new(AtomicBool::new(false));
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let cursor_url = old.url(&format!("/sub/busy?cursor={seen}&timeout=5"));
    let clients = hammer_with(fresh, cursor_url, Some(next), stop.clone());
    let empty = hammer(old.url("/sub/idle?timeout=0"), stop.clone());
    let admins = hammer(old.admin("/healthz"), stop.clone());
    let https = format!("https://localhost:{tls_port}/sub/idle?timeout=0");
    let secure = hammer_with(trusting(&pki), https, None, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The new process waits for the sockets; SIGQUIT hands them over.
    let _new = upgrade(&old, &[]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    old.signal("-QUIT");

    // The held poll is answered at once, with its cursor, and told to go.
    let (status, headers, v) = tokio::time::timeout(Duration::from_secs(6), held)
        .await
        .expect("answered on the hand-over")
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(position(v["cursor"].as_str().unwrap()), before.as_str());
    assert_eq!(v["messages"].as_array().unwrap().len(), 0);
    assert_eq!(v["gap"], false);
    assert_eq!(headers["connection"], "close");
    let exit = old
        .wait_exit(Duration::from_secs(15))
        .expect("the old process exits");
    assert!(exit.success(), "{exit}");

    // The same ports now reach the new process, which misses nothing.
    old.wait_ready();
    let during = old.publish("up", "text/plain", "after").await;
    let (status, _, v) = get_json(&old.url(&format!("/sub/up?cursor={before}"))).await;
    assert_eq!(status, 200);
    assert_eq!(v["gap"], false, "the new process resumes the old cursor");
    assert_eq!(ids(&v), [during]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let hammers = [
        ("client", clients),
        ("empty", empty),
        ("admin", admins),
        ("https", secure),
    ];
    for (name, task) in hammers {
        let (ok, failures) = task.await.unwrap();
        assert!(ok > 20, "{name}: only {ok} requests went through");
        assert!(
            failures.is_empty(),
            "{name}: {} failed: {failures:?}",
            failures.len()
        );
    }
    let _ = std::fs::remove_file(sock);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_to_a_new_admin_address_binds_it_and_keeps_the_handed_over_ones() {
    let sock = std::env::temp_dir().join(format!("pollgate-moved-{}.sock", std::process::id()));
    let mut old = Pollgate::start(&format!("upgrade_sock: \"{}\"\n{ROUTES}", sock.display()));
    let moved = free_port();
    let admin = format!("127.0.0.1:{moved}");
    let _new = upgrade(&old, &["--admin-listen", &admin]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    old.signal("-QUIT");
    let exit = old
        .wait_exit(Duration::from_secs(15))
        .expect("the old process exits");
    assert!(exit.success(), "{exit}");
    // The new admin address answers; the client listener came over.
    let healthz = format!("http://127.0.0.1:{moved}/healthz");
    let mut status = None;
    for _ in 0..100 {
        if let Ok(r) = client().get(&healthz).send().await {
            status = Some(r.status().as_u16());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, Some(200), "the new admin address is served");
    let (status, _, v) = get_json(&old.url("/sub/moved?timeout=0")).await;
    assert_eq!(status, 200, "{v}");
    // The old admin socket, handed over but not claimed, was closed (not
    // left to queue connections nobody accepts).
    let old_admin = std::net::TcpStream::connect(("127.0.0.1", old.admin_port));
    assert!(old_admin.is_err(), "the old admin address still listens");
    let _ = std::fs::remove_file(sock);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_to_a_taken_address_exits_2_naming_it() {
    let sock = std::env::temp_dir().join(format!("pollgate-taken-{}.sock", std::process::id()));
    let old = Pollgate::start(&format!("upgrade_sock: \"{}\"\n{ROUTES}", sock.display()));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = taken.local_addr().unwrap().to_string();
    let child = Command::new(env!("CARGO_BIN_EXE_pollgate"))
        .args(["serve", "-c", old.config.to_str().unwrap(), "--upgrade"])
        .args(["--admin-listen", &admin, "--log-level", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The new process gets the sockets on SIGQUIT, then fails on the
    // address it cannot have: through the one way out, not an abort.
    old.signal("-QUIT");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("cannot listen on {admin}")), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let _ = std::fs::remove_file(sock);
}

#[tokio::test]
async fn a_connection_serves_at_most_the_request_limit() {
    let pg = Pollgate::start(&format!(
        "listener:\n  keepalive_request_limit: 2\n{ROUTES}"
    ));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", pg.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let request = "GET /sub/limit?timeout=0 HTTP/1.1\r\nHost: x\r\n\r\n";
    let (_, first, _) = raw_exchange(&mut s, request);
    assert!(!first.iter().any(|(k, v)| k == "connection" && v == "close"));
    let (_, second, _) = raw_exchange(&mut s, request);
    assert!(
        second
            .iter()
            .any(|(k, v)| k == "connection" && v == "close"),
        "the second answer closes: {second:?}"
    );
}

#[test]
fn a_taken_port_is_an_error_at_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let f = temp_file(
        "taken.yaml",
        &format!(
            "listen: \"127.0.0.1:{port}\"\nadmin_listen: \"127.0.0.1:{}\"\n",
            free_port()
        ),
    );
    let (code, _, err) = run_cli(&["serve", "-c", f.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
}
