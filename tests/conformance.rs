//! The conformance matrix of docs/api.md, "What your backend receives":
//! every route kind that reaches a backend (plain, publish-through,
//! header-directed publish, authorize, watch) × every client protocol
//! (HTTP/1.0, HTTP/1.1, h2c, h2 over TLS), against a raw-socket backend
//! that records the bytes of each request head. The backend must get an
//! origin-form request line, one `Host`, `X-Forwarded-For/-Host/-Proto`,
//! no hop-by-hop header of the client's hop, one `Content-Length` with a
//! body and, on routes whose answer becomes a message, no
//! `Accept-Encoding` but identity; the client must get no hop-by-hop
//! header of the backend's hop, and HTTP/1.0 its `Connection: close`.
//! Then HTTP/1.0 and pipelining on every route kind (the lean subscribe
//! path included), gzipping backends, and Pingora's own refusals as JSON.
//!
//! A new kind of route cannot skip the matrix: [`kind_of`] matches every
//! `routes::Action` (a new variant does not compile), and the test checks
//! that each kind's sample request lands on a route of that kind.

mod support;

use bytes::Bytes;
use pollgate::config::Config;
use pollgate::routes::{Action, Match, RouteTable};
use pollgate::target::RequestTarget;
use std::time::Duration;
use support::pki::{install, pki, tls_config, Pki};
use support::rawbackend::{gzip, RawBackend, MEANT};
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The route kinds whose requests reach a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Plain,
    PublishThrough,
    HeaderPublish,
    Authorize,
    Watch,
}

const KINDS: [Kind; 5] = [
    Kind::Plain,
    Kind::PublishThrough,
    Kind::HeaderPublish,
    Kind::Authorize,
    Kind::Watch,
];

/// The kind of a compiled route; None for a subscribe route without
/// `authorize:`, whose requests reach no backend. Exhaustive: a new
/// `Action` does not compile until it is placed here (and so in the matrix).
fn kind_of(action: &Action) -> Option<Kind> {
    match action {
        Action::Subscribe(sub) => sub.authorize.as_ref().map(|_| Kind::Authorize),
        Action::Watch(_) => Some(Kind::Watch),
        Action::Proxy(p) => Some(match (&p.publish, p.publish_from_header) {
            (Some(_), _) => Kind::PublishThrough,
            (None, true) => Kind::HeaderPublish,
            (None, false) => Kind::Plain,
        }),
    }
}

/// A kind's sample request: method, target, body.
fn sample(kind: Kind) -> (&'static str, &'static str, &'static str) {
    match kind {
        Kind::Plain => ("POST", "/plain/page?q=1", "hi"),
        Kind::PublishThrough => ("POST", "/rooms/1/messages", "hi"),
        Kind::HeaderPublish => ("POST", "/hdr/x", "hi"),
        Kind::Authorize => ("GET", "/auth/1/events?timeout=0", ""),
        Kind::Watch => ("GET", "/orders/7", ""),
    }
}

/// A kind's sample request sent over `proto`: a watch request's query
/// names the protocol, as fetches of one unchanged resource are shared.
fn sample_via(kind: Kind, proto: Proto) -> (&'static str, String, &'static str) {
    let (method, path, body) = sample(kind);
    match kind {
        Kind::Watch => (method, format!("{path}?via={proto:?}"), body),
        _ => (method, path.to_string(), body),
    }
}

/// Whether the upstream's answer to a kind may become a message.
fn publishes(kind: Kind) -> bool {
    matches!(kind, Kind::PublishThrough | Kind::HeaderPublish)
}

/// One route of each kind (and the lean subscribe route) before `backend`.
fn routes(backend: &str) -> String {
    format!(
        r#"
upstreams:
  app:
    addrs: ["{backend}"]
routes:
  - path: "/sub/{{channel}}"
    subscribe:
      channels: ["{{channel}}"]
      first: oldest
  - path: "/auth/{{room}}/events"
    subscribe:
      channels: ["auth:{{room}}"]
      authorize: app
  - path: "/rooms/{{room}}/messages"
    methods: [POST]
    upstream: app
    publish:
      channel: "room:{{room}}"
      body: response
  - path: "/hdr/"
    upstream: app
    publish_from_header: true
  - path: "/orders/{{id}}"
    methods: [GET]
    upstream: app
    watch:
      channels: ["order:{{id}}"]
  - path: "/"
    upstream: app
"#
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Http10,
    Http11,
    H2c,
    H2Tls,
}

/// An answer as the client got it.
#[derive(Debug)]
struct Got {
    status: u16,
    /// Lowercased names.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one HTTP/1 answer (head, then a `Content-Length` body).
async fn read_h1(s: &mut (impl AsyncRead + Unpin)) -> Got {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = s.read_u8().await.expect("the answer's head");
        head.push(b);
    }
    let (status_line, headers, len) = answer_head(&String::from_utf8(head).unwrap());
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = vec![0; len];
    s.read_exact(&mut body).await.unwrap();
    Got {
        status,
        headers,
        body,
    }
}

/// Whether the server closes `s` within 3 s (nothing more to read).
async fn closes(s: &mut (impl AsyncRead + Unpin)) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(3), s.read(&mut byte)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// An HTTP/1 request's bytes, with hop-by-hop headers of the client's hop.
fn h1_request(version: &str, method: &str, path: &str, body: &str, extra: &str) -> String {
    let length = if body.is_empty() {
        String::new()
    } else {
        format!("Content-Length: {}\r\n", body.len())
    };
    format!(
        "{method} {path} {version}\r\nHost: h\r\nConnection: X-Client-Hop\r\nX-Client-Hop: 1\r\n\
         Keep-Alive: timeout=9\r\nProxy-Authorization: Basic eDp5\r\nAccept-Encoding: gzip, br\r\n\
         Authorization: Bearer good\r\n{extra}{length}\r\n{body}"
    )
}

/// A running gateway with a TLS listener in front of a raw backend.
struct Env {
    pg: Pollgate,
    tls_port: u16,
    pki: Pki,
    backend: RawBackend,
}

async fn env() -> Env {
    let backend = RawBackend::start().await;
    let pki = pki();
    let cert = temp_file("tls.crt", "");
    let key = temp_file("tls.key", "");
    install(&pki, &cert, &key);
    let tls_port = free_port();
    let pg = Pollgate::start(&format!(
        "tls:\n  listen: \"127.0.0.1:{tls_port}\"\n  cert: \"{}\"\n  key: \"{}\"\n{}",
        cert.display(),
        key.display(),
        routes(&backend.addr())
    ));
    Env {
        pg,
        tls_port,
        pki,
        backend,
    }
}

/// One HTTP/2 exchange on `io`.
async fn h2_exchange<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: T,
    scheme: &str,
    method: &str,
    path: &str,
    body: &str,
) -> Got {
    let (client, connection) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    // With its length, as browsers send a body they have whole (a body
    // without one goes to a plain route's backend chunked).
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("{scheme}://h{path}"))
        .header("accept-encoding", "gzip, br")
        .header("authorization", "Bearer good");
    if !body.is_empty() {
        req = req.header("content-length", body.len());
    }
    let req = req.body(()).unwrap();
    let mut client = client.ready().await.unwrap();
    let (response, mut send) = client.send_request(req, body.is_empty()).unwrap();
    if !body.is_empty() {
        send.send_data(Bytes::from(body.to_string()), true).unwrap();
    }
    let (status, headers, body) = h2c::answer(response).await;
    Got {
        status,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
            .collect(),
        body,
    }
}

/// Sends `kind`'s sample request over `proto`; the answer (for HTTP/1.0,
/// after checking that the connection closes).
async fn exchange(env: &Env, proto: Proto, kind: Kind) -> Got {
    let (method, path, body) = sample_via(kind, proto);
    let path = path.as_str();
    match proto {
        Proto::Http10 | Proto::Http11 => {
            let version = if proto == Proto::Http10 {
                "HTTP/1.0"
            } else {
                "HTTP/1.1"
            };
            let mut s = TcpStream::connect(("127.0.0.1", env.pg.port))
                .await
                .unwrap();
            s.write_all(h1_request(version, method, path, body, "").as_bytes())
                .await
                .unwrap();
            let got = read_h1(&mut s).await;
            if proto == Proto::Http10 {
                assert_eq!(got.header("connection"), Some("close"), "{kind:?}: {got:?}");
                assert!(closes(&mut s).await, "{kind:?}: HTTP/1.0 left open");
            } else {
                assert_eq!(got.header("connection"), Some("keep-alive"), "{kind:?}");
            }
            got
        }
        Proto::H2c => {
            let tcp = TcpStream::connect(("127.0.0.1", env.pg.port))
                .await
                .unwrap();
            h2_exchange(tcp, "http", method, path, body).await
        }
        Proto::H2Tls => {
            let tcp = TcpStream::connect(("127.0.0.1", env.tls_port))
                .await
                .unwrap();
            let connector = tokio_rustls::TlsConnector::from(tls_config(&env.pki, b"h2"));
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let tls = connector.connect(name, tcp).await.unwrap();
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            h2_exchange(tls, "https", method, path, body).await
        }
    }
}

/// Headers that belong to one hop (RFC 9110 §7.6.1), and those the
/// client's and the backend's `Connection` named.
const HOP: &[&str] = &[
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "x-client-hop",
    "x-hop",
];

#[test]
fn every_route_kind_is_in_the_matrix() {
    let yaml = format!(
        "listen: \"127.0.0.1:1\"\nadmin_listen: \"127.0.0.1:2\"\n{}",
        routes("127.0.0.1:3")
    );
    let config = Config::parse("conformance.yaml", &yaml).unwrap();
    let table = RouteTable::compile(&config, "conformance.yaml").unwrap();
    for kind in KINDS {
        let (method, path, _) = sample(kind);
        let target = RequestTarget::parse(path).unwrap();
        let Match::Found(route, _) = table.find(method, &target) else {
            panic!("no route for {kind:?}");
        };
        assert_eq!(kind_of(&route.action), Some(kind), "{path}");
    }
    let lean = table.find("GET", &RequestTarget::parse("/sub/a").unwrap());
    assert!(matches!(lean, Match::Found(r, _) if kind_of(&r.action).is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_kind_over_every_protocol_sends_backends_correct_http() {
    let env = env().await;
    for proto in [Proto::Http10, Proto::Http11, Proto::H2c, Proto::H2Tls] {
        for kind in KINDS {
            let before = env.backend.seen().len();
            let got = exchange(&env, proto, kind).await;
            let case = format!("{kind:?} over {proto:?}");
            assert_eq!(got.status, 200, "{case}: {got:?}");
            let seen = env.backend.seen();
            assert_eq!(
                seen.len(),
                before + 1,
                "{case}: one backend request, not {:?}",
                &seen[before..]
            );
            let req = seen.last().unwrap();
            let (method, path, body) = sample_via(kind, proto);
            assert_eq!(req.line(), format!("{method} {path} HTTP/1.1"), "{case}");
            assert_eq!(req.all("host"), ["h"], "{case}: {}", req.head);
            assert_eq!(req.all("x-forwarded-for"), ["127.0.0.1"], "{case}");
            assert_eq!(req.all("x-forwarded-host"), ["h"], "{case}");
            let proto_seen = if proto == Proto::H2Tls {
                "https"
            } else {
                "http"
            };
            assert_eq!(req.all("x-forwarded-proto"), [proto_seen], "{case}");
            for name in HOP {
                assert!(req.all(name).is_empty(), "{case}: {name} in {}", req.head);
            }
            // Pollgate's own hop to the backend may say keep-alive or close.
            for value in req.all("connection") {
                assert!(
                    value.eq_ignore_ascii_case("keep-alive") || value.eq_ignore_ascii_case("close"),
                    "{case}: {}",
                    req.head
                );
            }
            if body.is_empty() {
                assert!(
                    req.all("content-length").iter().all(|v| *v == "0"),
                    "{case}"
                );
            } else {
                assert_eq!(
                    req.all("content-length"),
                    [body.len().to_string()],
                    "{case}"
                );
                assert_eq!(req.body, body.as_bytes(), "{case}");
            }
            if publishes(kind) {
                assert_eq!(req.all("accept-encoding"), ["identity"], "{case}");
            }
            for name in HOP {
                assert!(
                    got.header(name).is_none(),
                    "{case}: {name} reached the client"
                );
            }
            if matches!(proto, Proto::H2c | Proto::H2Tls) {
                assert!(got.header("connection").is_none(), "{case}");
            }
            if kind != Kind::Authorize {
                assert_eq!(got.body, MEANT.as_bytes(), "{case}");
            }
        }
    }
}

/// Sample requests of every kind, and a lean subscribe request.
fn every_kind_and_lean() -> Vec<(&'static str, &'static str, &'static str)> {
    let mut all: Vec<_> = KINDS.iter().map(|k| sample(*k)).collect();
    all.push(("GET", "/sub/lean?timeout=0", ""));
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_closes_unless_it_asked_for_keep_alive_on_every_route_kind() {
    let env = env().await;
    for (method, path, body) in every_kind_and_lean() {
        let mut s = TcpStream::connect(("127.0.0.1", env.pg.port))
            .await
            .unwrap();
        let plain = format!("{method} {path} HTTP/1.0\r\nHost: h\r\nAuthorization: Bearer good\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        s.write_all(plain.as_bytes()).await.unwrap();
        let got = read_h1(&mut s).await;
        assert_eq!(got.status, 200, "{path}: {got:?}");
        assert_eq!(got.header("connection"), Some("close"), "{path}");
        assert!(closes(&mut s).await, "{path}: left open");
        // Asked for: kept, and a second request is answered.
        let mut s = TcpStream::connect(("127.0.0.1", env.pg.port))
            .await
            .unwrap();
        let kept = plain.replacen("Host: h\r\n", "Host: h\r\nConnection: keep-alive\r\n", 1);
        for round in 0..2 {
            s.write_all(kept.as_bytes()).await.unwrap();
            let got = read_h1(&mut s).await;
            assert_eq!(got.status, 200, "{path} #{round}");
            assert_eq!(
                got.header("connection"),
                Some("keep-alive"),
                "{path} #{round}"
            );
        }
    }
}

/// Reads the answers to two pipelined requests of `path` (200, the
/// connection kept) and to the plain GET written behind them.
async fn two_then_plain_answered(s: &mut TcpStream, path: &str) {
    for round in 0..2 {
        let got = read_h1(s).await;
        assert_eq!(got.status, 200, "{path} #{round}: {got:?}");
        assert_eq!(got.header("connection"), Some("keep-alive"), "{path}");
    }
    let got = read_h1(s).await;
    assert_eq!(
        (got.status, got.body.as_slice()),
        (200, MEANT.as_bytes()),
        "{path}: the third"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_on_every_route_kind() {
    let env = env().await;
    for (method, path, body) in every_kind_and_lean() {
        let mut s = TcpStream::connect(("127.0.0.1", env.pg.port))
            .await
            .unwrap();
        let one = h1_request("HTTP/1.1", method, path, body, "");
        let last = h1_request("HTTP/1.1", "GET", "/plain/after", "", "");
        // Two of the kind's requests and a plain one, written at once.
        s.write_all(format!("{one}{one}{last}").as_bytes())
            .await
            .unwrap();
        two_then_plain_answered(&mut s, path).await;
        let seen = env.backend.seen();
        assert!(
            seen.last().unwrap().line().starts_with("GET /plain/after "),
            "{path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_requests_keep_the_connection_and_their_followers_are_answered() {
    let env = env().await;
    for kind in KINDS.iter().filter(|k| !sample(**k).2.is_empty()) {
        let (method, path, _) = sample(*kind);
        let mut s = TcpStream::connect(("127.0.0.1", env.pg.port))
            .await
            .unwrap();
        // A chunked body (with an extension and a trailer), twice, then a
        // plain request: written at once, then cut at odd places.
        let chunked = h1_request(
            "HTTP/1.1",
            method,
            path,
            "",
            "Transfer-Encoding: chunked\r\n",
        ) + "1;x=y\r\nh\r\n1\r\ni\r\n0\r\nX-Trailer: 1\r\n\r\n";
        let last = h1_request("HTTP/1.1", "GET", "/plain/after", "", "");
        let all = format!("{chunked}{chunked}{last}");
        for part in all.as_bytes().chunks(all.len() / 3 + 1) {
            s.write_all(part).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        two_then_plain_answered(&mut s, path).await;
        let seen = env.backend.seen();
        let [.., first, second, third] = seen.as_slice() else {
            panic!("{path}: {seen:?}");
        };
        for got in [first, second] {
            assert_eq!(got.body, b"hi", "{path}: the body, decoded whole");
        }
        assert!(third.line().starts_with("GET /plain/after "), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_to_http10_is_close_delimited() {
    let env = env().await;
    let mut s = TcpStream::connect(("127.0.0.1", env.pg.port))
        .await
        .unwrap();
    s.write_all(b"GET /sub/sse HTTP/1.0\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.contains("text/event-stream"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let mut hello = [0u8; 12];
    s.read_exact(&mut hello).await.unwrap();
    assert_eq!(&hello, b": pollgate\n\n", "the stream's bytes, unchunked");
}

/// The message the subscribe route finds first on `channel`.
async fn first_message(pg: &Pollgate, channel: &str) -> serde_json::Value {
    let (status, _, v) = get_json(&pg.url(&format!("/sub/{channel}?timeout=0"))).await;
    assert_eq!(status, 200);
    v["messages"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_what_a_gzipping_backend_meant() {
    let env = env().await;
    let pg = &env.pg;
    for (path, channel) in [
        ("/rooms/gzip-if-asked/messages", "room:gzip-if-asked"),
        ("/rooms/gzip-always/messages", "room:gzip-always"),
        ("/hdr/gzip-always", "hdr"),
    ] {
        let r = client()
            .post(pg.url(path))
            .header("Accept-Encoding", "gzip")
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(r.headers().get("pollgate-message-id").is_some(), "{path}");
        assert!(
            r.headers().get("pollgate-publish-error").is_none(),
            "{path}"
        );
        assert!(r.headers().get("content-encoding").is_none(), "{path}");
        assert_eq!(r.bytes().await.unwrap(), MEANT.as_bytes(), "{path}");
        let m = first_message(pg, channel).await;
        assert_eq!(m["data"], MEANT, "{path}: {m}");
        assert_eq!(
            env.backend.seen().last().unwrap().all("accept-encoding"),
            ["identity"]
        );
    }
    // A client that refuses identity gets gzip.
    let mut s = TcpStream::connect(("127.0.0.1", pg.port)).await.unwrap();
    let req = h1_request(
        "HTTP/1.1",
        "POST",
        "/rooms/z/messages",
        "x",
        "Accept-Encoding: gzip;q=1, identity;q=0\r\n",
    )
    .replacen("Accept-Encoding: gzip, br\r\n", "", 1);
    s.write_all(req.as_bytes()).await.unwrap();
    let got = read_h1(&mut s).await;
    assert_eq!(got.header("content-encoding"), Some("gzip"), "{got:?}");
    let mut plain = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&got.body[..]), &mut plain)
        .unwrap();
    assert_eq!(plain, MEANT);
    assert_ne!(gzip(b"x"), b"x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_pingora_refuses_get_the_json_refusal() {
    let env = env().await;
    for head in [
        "POST /plain HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n",
        "POST /plain HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "GET /auth/1/events HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", env.pg.port))
            .await
            .unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let got = read_h1(&mut s).await;
        let v: serde_json::Value = serde_json::from_slice(&got.body).unwrap_or_default();
        assert_eq!(
            (got.status, v["error"].as_str()),
            (400, Some("bad_request")),
            "{head}: {got:?}"
        );
    }
    // CONNECT over HTTP/2: Pingora's proxy would answer a bare 405.
    let client = h2c::connect(&env.pg).await;
    let req = http::Request::builder()
        .method("CONNECT")
        .uri("h:443")
        .body(())
        .unwrap();
    let mut client = client.ready().await.unwrap();
    let (response, _) = client.send_request(req, true).unwrap();
    let (status, _, body) = h2c::answer(response).await;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    assert_eq!(
        (status, v["error"].as_str()),
        (405, Some("method_not_allowed"))
    );
    assert!(env.backend.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http2_requests_reach_no_backend() {
    let env = env().await;
    let client = h2c::connect(&env.pg).await;
    let mut client = client.ready().await.unwrap();
    // A Host that is not the :authority: 400 (from Pingora's HTTP/2 server).
    let req = http::Request::post("http://h/plain/x")
        .header("host", "elsewhere")
        .body(())
        .unwrap();
    let (response, _) = client.send_request(req, true).unwrap();
    let (status, _, _) = h2c::answer(response).await;
    assert_eq!(status, 400);
    // Two different content-length values: the stream is reset
    // (RFC 9113 section 8.1.1), and the connection goes on.
    let mut client = client.ready().await.unwrap();
    let req = http::Request::post("http://h/plain/x")
        .header("content-length", "1")
        .header("content-length", "2")
        .body(())
        .unwrap();
    let (response, mut body) = client.send_request(req, false).unwrap();
    // The reset may come first.
    let _ = body.send_data(Bytes::from_static(b"ab"), true);
    let e = response.await.expect_err("a reset, not an answer");
    assert_eq!(e.reason(), Some(h2::Reason::PROTOCOL_ERROR), "{e}");
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get("http://h/plain/ok").body(()).unwrap();
    let (response, _) = client.send_request(req, true).unwrap();
    assert_eq!(h2c::answer(response).await.0, 200);
    let seen = env.backend.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].line().starts_with("GET /plain/ok "));
}
