//! What a backend receives (docs/api.md, "What your backend receives"),
//! tried as a strict backend would: origin-form targets, no hop-by-hop
//! header (nor one the client's `Connection` names) on any route kind, one
//! `Content-Length`, and every head a backend would choke on refused with
//! the documented JSON body before it gets there.

mod support;

use support::backend::Backend;
use support::*;

/// Every route kind in front of `backend`.
fn routes(backend: &Backend) -> String {
    format!(
        r#"
upstreams:
  app:
    addrs: ["{}"]
routes:
  - path: "/rooms/{{room}}/events"
    methods: [GET]
    subscribe:
      channels: ["room:{{room}}"]
      authorize: app
  - path: "/rooms/{{room}}/messages"
    methods: [POST]
    upstream: app
    publish:
      channel: "room:{{room}}"
  - path: "/orders/{{id}}"
    methods: [GET]
    upstream: app
    watch:
      channels: ["order:{{id}}"]
  - path: "/"
    upstream: app
"#,
        backend.addr()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_hop_by_hop_header_reaches_a_backend_on_any_route_kind() {
    let backend = Backend::start().await;
    let pg = Pollgate::start(&routes(&backend));
    let hop =
        "Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\nProxy-Authorization: Basic eDp5\r\n";
    let requests = [
        format!("GET /plain/page HTTP/1.1\r\nHost: h\r\n{hop}\r\n"),
        format!("POST /rooms/1/messages HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n{hop}\r\nhi"),
        format!("GET /rooms/1/events?timeout=0 HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer good\r\n{hop}\r\n"),
        format!("GET /orders/7 HTTP/1.1\r\nHost: h\r\n{hop}\r\n"),
    ];
    for request in &requests {
        let before = backend.seen().len();
        let (status, v) = pg.raw(request);
        assert!(status < 300, "{status} {v} for {request}");
        let seen = backend.seen();
        assert_eq!(seen.len(), before + 1, "one backend request for {request}");
        let got = seen.last().unwrap();
        for name in ["x-hop", "proxy-authorization", "keep-alive"] {
            assert!(
                got.header(name).is_none(),
                "{name} reached the backend: {got:?}"
            );
        }
        assert_eq!(got.header("host"), Some("h"), "{got:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_go_in_origin_form_with_one_content_length() {
    let backend = Backend::start().await;
    let pg = Pollgate::start(&routes(&backend));
    let (status, _) =
        pg.raw("GET http://evil.example:81/x?y=1 HTTP/1.1\r\nHost: evil.example:81\r\n\r\n");
    assert_eq!(status, 200);
    let got = backend.seen().pop().unwrap();
    assert_eq!(got.path_and_query, "/x?y=1");
    assert_eq!(got.header("host"), Some("evil.example:81"));
    let (status, _) = pg
        .raw("POST /plain HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi");
    assert_eq!(status, 201);
    let got = backend.seen().pop().unwrap();
    assert_eq!(got.all("content-length"), ["2"]);
    assert_eq!(got.body, b"hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_a_backend_would_choke_on_get_the_json_refusal() {
    let backend = Backend::start().await;
    let pg = Pollgate::start(&routes(&backend));
    for head in [
        "GET /plain HTTP/1.1\r\n\r\n",
        "GET /plain HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "GET /plain HTTP/1.1\r\nHost: a@b\r\n\r\n",
        "GET http://a/plain HTTP/1.1\r\nHost: b\r\n\r\n",
        "POST /plain HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi",
        "POST /plain HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\nhi",
    ] {
        let (status, v) = pg.raw(head);
        assert_eq!(
            (status, v["error"].as_str()),
            (400, Some("bad_request")),
            "{head}"
        );
        assert!(
            v["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{head}"
        );
    }
    assert!(backend.seen().is_empty(), "nothing reached the backend");
}
