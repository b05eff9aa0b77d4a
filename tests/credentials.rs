//! Credentials toward authorize upstreams (docs/api.md, "Authorizing
//! subscribers"), tried as an attacker would: HTTP/2 cookie crumbs and a
//! custom credential header key the authorization cache on every field
//! they carry, exactly those fields reach the authorize upstream, and
//! crumbs reach every backend as one `Cookie`.

mod support;

use support::backend::Backend;
use support::h2c::*;
use support::*;

/// A cached subscribe route keyed on cookies, one keyed on `X-Api-Key`,
/// and a catch-all proxy to `backend`.
fn routes(backend: &Backend) -> String {
    format!(
        r#"
upstreams:
  app:
    addrs: ["{}"]
routes:
  - path: "/cached/{{room}}/events"
    methods: [GET]
    subscribe:
      channels: ["room:{{room}}"]
      timeout: 5s
      authorize: app
      authorize_cache: 30s
  - path: "/keyed/{{room}}/events"
    methods: [GET]
    subscribe:
      channels: ["room:{{room}}"]
      timeout: 5s
      authorize: app
      authorize_cache: 30s
      authorize_credentials: [X-Api-Key]
  - path: "/"
    upstream: app
"#,
        backend.addr()
    )
}

/// Status of a GET with `headers` over HTTP/1.1.
async fn h1_status(url: &str, headers: &[(&str, &str)]) -> u16 {
    let mut req = client().get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_crumbs_are_one_credential_and_the_cache_cannot_be_borrowed() {
    let backend = Backend::start().await;
    let pg = Pollgate::start(&routes(&backend));
    let mut h2 = connect(&pg).await;
    let victim = [("cookie", "a=1"), ("cookie", "session=V")];

    // The victim's HTTP/2 poll, its session cookie in the second crumb.
    let (status, _, _) = answer(get(&mut h2, "/cached/1/events?timeout=0", &victim).await.0).await;
    assert_eq!(status, 200, "the victim is allowed");
    let call = backend.seen().pop().unwrap();
    assert_eq!(
        call.all("cookie"),
        ["a=1; session=V"],
        "the authorize upstream gets the crumbs as one Cookie"
    );

    // The attacker has only the first crumb: not served from the cache.
    let url = pg.url("/cached/1/events?timeout=0");
    assert_eq!(h1_status(&url, &[("Cookie", "a=1")]).await, 401);
    assert_eq!(backend.seen().len(), 2, "the attacker's poll was asked");

    // The reverse: an attacker's denial is not served to the victim.
    let url = pg.url("/cached/2/events?timeout=0");
    assert_eq!(h1_status(&url, &[("Cookie", "a=1")]).await, 401);
    let (status, _, _) = answer(get(&mut h2, "/cached/2/events?timeout=0", &victim).await.0).await;
    assert_eq!(status, 200, "the victim's own crumbs decide");

    // The same crumbs again: served from the cache.
    let calls = backend.seen().len();
    let (status, _, _) = answer(get(&mut h2, "/cached/1/events?timeout=0", &victim).await.0).await;
    assert_eq!(status, 200);
    let joined = [("Cookie", "a=1; session=V")];
    assert_eq!(
        h1_status(&pg.url("/cached/1/events?timeout=0"), &joined).await,
        200
    );
    assert_eq!(backend.seen().len(), calls, "one Cookie or crumbs: one key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_credential_keys_the_cache_and_is_all_the_upstream_sees() {
    let backend = Backend::start().await;
    let pg = Pollgate::start(&routes(&backend));
    let url = pg.url("/keyed/1/events?timeout=0");
    let good = [
        ("X-Api-Key", "good"),
        ("Authorization", "Bearer secret-of-another-app"),
        ("X-Other", "1"),
        ("Cookie", "tracking=1"),
    ];
    assert_eq!(h1_status(&url, &good).await, 200);
    let call = backend.seen().pop().unwrap();
    let mut names: Vec<&str> = call.headers.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "host",
            "x-api-key",
            "x-forwarded-for",
            "x-forwarded-host",
            "x-forwarded-proto"
        ],
        "exactly the credentials, Host and X-Forwarded-*"
    );

    // A wrong key, or none, is not allowed from the cache.
    assert_eq!(h1_status(&url, &[("X-Api-Key", "bad")]).await, 401);
    assert_eq!(h1_status(&url, &[]).await, 401);
    assert_eq!(backend.seen().len(), 3, "each key asked once");
    // Authorization is not this route's credential: never sent, so it
    // presents what no key presents, whose denial is remembered.
    let other = [("Authorization", "Bearer good")];
    assert_eq!(h1_status(&url, &other).await, 401);
    // The good key again: from the cache.
    assert_eq!(h1_status(&url, &[("X-Api-Key", "good")]).await, 200);
    assert_eq!(backend.seen().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crumbs_reach_a_proxied_backend_as_one_cookie_with_a_host() {
    let backend = Backend::start().await;
    let pg = Pollgate::start(&routes(&backend));
    let mut h2 = connect(&pg).await;
    let crumbs = [
        ("cookie", "a=1"),
        ("cookie", "b=2"),
        ("x-forwarded-for", "10.0.0.1"),
    ];
    let (status, _, _) = answer(get(&mut h2, "/plain/page", &crumbs).await.0).await;
    assert_eq!(status, 200);
    let seen = backend.seen().pop().unwrap();
    assert_eq!(seen.all("cookie"), ["a=1; b=2"]);
    assert_eq!(seen.all("host"), ["localhost"], "Host from :authority");
    assert_eq!(seen.all("x-forwarded-for"), ["10.0.0.1, 127.0.0.1"]);
}
