//! HTTPS on the client listener (docs/configuration.md, `tls`): HTTP/2 and
//! HTTP/1.1 by ALPN, `X-Forwarded-Proto: https` to upstreams, a rotated
//! certificate picked up by new handshakes (on its own and on SIGHUP) while
//! open connections stay, a handshake timeout, and an HTTP/2 connection
//! that sends no request within `limits.header_timeout` closed. Certificates are made by
//! the test (rcgen); the client speaks real TLS (rustls).

mod support;

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use support::backend::Backend;
use support::pki::{install, pki, tls_config, trusting, trusting_builder, Pki};
use support::*;

/// A gateway with a TLS listener on the `pki` pair, `extra` config and
/// the usual routes unless `extra` has its own; (gateway, https base URL,
/// cert path, key path).
fn start(pki: &Pki, extra: &str) -> (Pollgate, String, PathBuf, PathBuf) {
    let cert = temp_file("tls.crt", "");
    let key = temp_file("tls.key", "");
    install(pki, &cert, &key);
    let port = free_port();
    let routes = if extra.contains("routes:") {
        ""
    } else {
        ROUTES
    };
    let pg = Pollgate::start(&format!(
        "tls:\n  listen: \"127.0.0.1:{port}\"\n  cert: \"{}\"\n  key: \"{}\"\n{extra}{routes}",
        cert.display(),
        key.display()
    ));
    (pg, format!("https://localhost:{port}"), cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_h2_and_http1_and_tells_upstreams_it_was_https() {
    let pki = pki();
    let backend = Backend::start().await;
    let upstream = format!("upstreams:\n  app:\n    addrs: [\"{}\"]\n", backend.addr());
    let (pg, base, _, _) = start(&pki, &upstream);
    // ALPN picks HTTP/2, or HTTP/1.1 for a client that offers only that.
    let h2 = trusting(&pki);
    let h1 = trusting_builder(&pki).http1_only().build().unwrap();
    for (client, version) in [(&h2, http::Version::HTTP_2), (&h1, http::Version::HTTP_11)] {
        let r = client
            .get(format!("{base}/sub/tls?timeout=0"))
            .send()
            .await
            .unwrap();
        assert_eq!((r.status().as_u16(), r.version()), (200, version));
    }
    // A held poll over TLS is answered by a publish.
    let url = format!("{base}/sub/tls");
    let held = tokio::spawn(async move { h2.get(url).send().await.unwrap().text().await.unwrap() });
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    pg.publish("tls", "text/plain", "over tls").await;
    assert!(held.await.unwrap().contains("over tls"));

    // Upstreams learn how the client came in.
    let authorize = format!(
        "{upstream}routes:\n  - path: \"/rooms/{{room}}/events\"\n    subscribe:\n      channels: [\"room:{{room}}\"]\n      authorize: app\n"
    );
    let (pg2, base2, _, _) = start(&pki, &authorize);
    let r = trusting(&pki)
        .get(format!("{base2}/rooms/1/events?timeout=0"))
        .header("Authorization", "Bearer good")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = backend.seen();
    assert_eq!(
        seen.last().unwrap().header("x-forwarded-proto"),
        Some("https")
    );
    let plain = client()
        .get(pg2.url("/rooms/1/events?timeout=0"))
        .header("Authorization", "Bearer good")
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 200);
    assert_eq!(
        backend.seen().last().unwrap().header("x-forwarded-proto"),
        Some("http")
    );
}

/// True once a new connection that trusts only `pki` is served at `base`
/// (tried until `within` has passed).
async fn served(pki: &Pki, base: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let r = trusting(pki)
            .get(format!("{base}/sub/rotate?timeout=0"))
            .send()
            .await;
        if r.is_ok_and(|r| r.status() == 200) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_serves_new_handshakes_and_open_connections_stay() {
    let first = pki();
    let (pg, base, cert, key) = start(&first, "");
    // A connection made with the first certificate holds a poll.
    let old = trusting(&first);
    let url = format!("{base}/sub/rotate");
    let held = tokio::spawn(async move { old.get(url).send().await.unwrap().status() });
    pg.wait_metric("pollgate_held_requests", 1.0).await;

    // cert-manager (say) rotates the files: picked up on its own.
    let second = pki();
    install(&second, &cert, &key);
    assert!(
        served(&second, &base, Duration::from_secs(6)).await,
        "the new certificate was never served"
    );
    let stale = trusting(&first)
        .get(format!("{base}/sub/rotate?timeout=0"))
        .send()
        .await;
    assert!(
        stale.is_err(),
        "new handshakes no longer use the old certificate"
    );
    assert_eq!(
        pg.metric("pollgate_held_requests").await,
        1.0,
        "the open connection stays"
    );
    pg.publish("rotate", "text/plain", "after rotation").await;
    assert_eq!(held.await.unwrap(), 200);

    // SIGHUP reads them again at once.
    let third = pki();
    install(&third, &cert, &key);
    pg.signal("-HUP");
    assert!(
        served(&third, &base, Duration::from_secs(1)).await,
        "SIGHUP did not reload the certificate"
    );

    // A broken pair is refused and the current one kept.
    std::fs::write(&cert, "not a certificate").unwrap();
    pg.signal("-HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = trusting(&third)
        .get(format!("{base}/sub/rotate?timeout=0"))
        .send()
        .await;
    assert_eq!(r.unwrap().status(), 200);
}

#[tokio::test]
async fn a_handshake_that_never_comes_is_cut() {
    let pki = pki();
    let (_pg, base, _, _) = start(&pki, "  handshake_timeout: 500ms\n");
    let port: u16 = base.rsplit(':').next().unwrap().parse().unwrap();
    let mut silent = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = Instant::now();
    assert_eq!(silent.read(&mut [0u8; 8]).unwrap_or(0), 0, "closed");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "by the handshake timeout"
    );
}

#[test]
fn an_unreadable_certificate_is_a_clear_error() {
    let port = free_port();
    let f = temp_file(
        "badtls.yaml",
        &format!(
            "tls:\n  listen: \"127.0.0.1:{port}\"\n  cert: /no/such.crt\n  key: /no/such.key\n"
        ),
    );
    let (code, _, err) = run_cli(&["check", "-c", f.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("tls.cert: cannot read '/no/such.crt'"),
        "{err}"
    );
    let junk = temp_file("junk.crt", "junk");
    let f = temp_file(
        "junktls.yaml",
        &format!(
            "tls:\n  listen: \"127.0.0.1:{port}\"\n  cert: \"{}\"\n  key: \"{}\"\n",
            junk.display(),
            junk.display()
        ),
    );
    let (code, _, err) = run_cli(&["serve", "-c", f.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("tls:"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_connection_silent_after_the_handshake_is_closed_at_the_header_timeout() {
    use tokio::io::AsyncReadExt;

    let pki = pki();
    let (pg, base, _, _) = start(&pki, "limits:\n  header_timeout: 1s\n");
    let mut tls = connect_tls(&pki, &base, b"h2").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    // Nothing sent after the handshake: closed (EOF or an error) soon
    // after the header timeout.
    let started = Instant::now();
    let reading = async {
        let mut buf = [0u8; 1024];
        while let Ok(n) = tls.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(6), reading)
        .await
        .expect("the connection is closed");
    let took = started.elapsed();
    assert!(took < Duration::from_millis(2500), "closed after {took:?}");
    pg.wait_metric("pollgate_refused_total{reason=\"header_timeout\"}", 1.0)
        .await;
}

/// A certificate file whose read blocks (a FIFO with no writer, standing
/// for a hung network mount) stalls no poll: with one worker thread, polls
/// and publishes are served while the read waits; when the data comes,
/// the new pair is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_read_that_blocks_stalls_no_poll() {
    let first = pki();
    let (pg, base, cert, key) = start(&first, "threads: 1\n");
    std::fs::remove_file(&cert).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&cert)
        .status()
        .unwrap();
    assert!(made.success());
    // The next check (every 2 s) sees the change and opens the FIFO.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let within = Duration::from_secs(3);
    let r = tokio::time::timeout(within, client().get(pg.url("/sub/fifo?timeout=0")).send())
        .await
        .expect("a poll is answered while the certificate is being read")
        .unwrap();
    assert_eq!(r.status(), 200);
    let url = pg.url("/sub/fifo");
    let held = tokio::spawn(async move { client().get(url).send().await.unwrap() });
    tokio::time::timeout(within, pg.wait_metric("pollgate_held_requests", 1.0))
        .await
        .expect("a poll is held");
    tokio::time::timeout(within, pg.publish("fifo", "text/plain", "still here"))
        .await
        .expect("a publish is served");
    let answer = tokio::time::timeout(within, held).await.unwrap().unwrap();
    assert!(answer.text().await.unwrap().contains("still here"));

    // The files come: the new key, then the new certificate through the
    // FIFO, which the pending read takes.
    let second = pki();
    std::fs::write(&key, &second.key_pem).unwrap();
    let (fifo, pem) = (cert.clone(), second.cert_pem.clone());
    let writer = std::thread::spawn(move || std::fs::write(fifo, pem).unwrap());
    assert!(
        served(&second, &base, Duration::from_secs(6)).await,
        "the pair read from the FIFO was never served"
    );
    writer.join().unwrap();
}

/// A drain waits for the client connections it accepted: one whose TLS
/// handshake (HTTP/1.1) or first HTTP/2 stream comes after the drain began
/// is answered, with its cursor, and only then does the instance exit.
/// (A drain with nothing in flight ends at once: without the wait, the
/// instance would be gone long before these requests.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_waits_for_the_first_request_of_a_connection_it_accepted() {
    use rustls::pki_types::ServerName;
    use tokio::io::AsyncWriteExt;

    let pki = pki();
    let (mut pg, base, _, _) = start(&pki, "grace_period: 20s\nlimits:\n  header_timeout: 10s\n");
    let at = pg.publish("late", "text/plain", "one").await;
    let port: u16 = base.rsplit(':').next().unwrap().parse().unwrap();
    // Connected, no handshake yet; and an HTTP/2 connection without a stream.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let h2 = connect_tls(&pki, &base, b"h2").await;
    tokio::time::sleep(Duration::from_millis(300)).await; // accepted by now
    pg.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(3000)).await;

    let connector = tokio_rustls::TlsConnector::from(tls_config(&pki, b"http/1.1"));
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .expect("the handshake is served");
    let head = format!("GET /sub/late?cursor={at}&timeout=30 HTTP/1.1\r\nHost: x\r\n\r\n");
    tls.write_all(head.as_bytes()).await.unwrap();
    let body = read_answers(&mut tls, 1).await.remove(0);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(position(v["cursor"].as_str().unwrap()), at.as_str(), "{v}");

    let (mut client, connection) = h2::client::handshake(h2).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let path = format!("/sub/late?cursor={at}&timeout=30");
    let (response, _) = support::h2c::get(&mut client, &path, &[]).await;
    let (status, _, body) = support::h2c::answer(response).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(position(v["cursor"].as_str().unwrap()), at.as_str(), "{v}");

    let exit = pg
        .wait_exit(Duration::from_secs(10))
        .expect("exits once they were answered");
    assert!(exit.success(), "{exit}");
}

/// A raw TLS connection (rustls) to the gateway at `base` that trusts
/// only `pki` and offers `alpn`.
async fn connect_tls(
    pki: &Pki,
    base: &str,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::ServerName;
    let port: u16 = base.rsplit(':').next().unwrap().parse().unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls_config(pki, alpn));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// Reads HTTP/1.1 answers from `tls` until `count` whole ones (each with a
/// `Content-Length`) have come; returns their bodies.
async fn read_answers(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    count: usize,
) -> Vec<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut bodies = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while bodies.len() < count {
        let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
            .await
            .expect("answers within 5 s")
            .unwrap();
        assert!(n > 0, "closed after {} answers", bodies.len());
        got.extend_from_slice(&buf[..n]);
        while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if got.len() < end + 4 + len {
                break;
            }
            bodies.push(got[end + 4..end + 4 + len].to_vec());
            got.drain(..end + 4 + len);
        }
    }
    bodies
}

/// What a strict client checks of the TLS connection itself: large bodies
/// cross it whole both ways on HTTP/1.1 and HTTP/2, pipelined requests are
/// answered in order, a client's `close_notify` is answered with the end
/// of the stream, a held poll whose client leaves is released, and bytes
/// that are not TLS are refused without harm to anyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_carry_large_bodies_pipelines_and_closes_whole() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = pki();
    let backend = Backend::start().await;
    let config = format!(
        "limits:\n  max_body: 4MiB\nupstreams:\n  app:\n    addrs: [\"{}\"]\n{}  - path: \"/api/{{rest}}\"\n    upstream: app\n",
        backend.addr(),
        ROUTES.trim_start()
    );
    let (pg, base, _, _) = start(&pki, &config);

    // 3 MB up to the backend, on both protocols.
    let body: Vec<u8> = (0..3_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let h1 = trusting_builder(&pki).http1_only().build().unwrap();
    for client in [trusting(&pki), h1.clone()] {
        let r = client
            .post(format!("{base}/api/upload"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(backend.seen().last().unwrap().body, body);
    }
    // A 3 MB message down to a poll held over TLS.
    let url = format!("{base}/raw/big");
    let held = tokio::spawn(async move { h1.get(url).send().await.unwrap().bytes().await });
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    let text = String::from_utf8(body.clone()).unwrap();
    pg.publish("big", "text/plain", &text).await;
    assert_eq!(held.await.unwrap().unwrap(), body);

    // Two requests in one write: two answers, in order.
    let mut tls = connect_tls(&pki, &base, b"http/1.1").await;
    tls.write_all(
        b"GET /oldest/big?timeout=0 HTTP/1.1\r\nHost: localhost\r\n\r\n\
          GET /sub/none?timeout=0 HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await
    .unwrap();
    let bodies = read_answers(&mut tls, 2).await;
    assert!(
        bodies[0].len() > body.len(),
        "the first answer is the message"
    );
    assert!(!bodies[1].is_empty() && bodies[1].len() < 1000);
    // The client's close_notify: the server ends the stream too.
    tls.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    assert!(matches!(end, Ok(Ok(0))), "{end:?}");

    // A poll held over TLS whose client goes away is released.
    let mut tls = connect_tls(&pki, &base, b"http/1.1").await;
    tls.write_all(b"GET /sub/left HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    drop(tls);
    pg.wait_metric("pollgate_held_requests", 0.0).await;

    // Bytes that are not TLS: the connection is closed, others are served.
    let port: u16 = base.rsplit(':').next().unwrap().parse().unwrap();
    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    plain
        .write_all(b"GET /sub/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(closed.is_ok(), "closed");
    assert!(!String::from_utf8_lossy(&answer).contains("HTTP/1.1 200"));
    let r = trusting(&pki)
        .get(format!("{base}/sub/after?timeout=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    pg.assert_no_panic();
}
