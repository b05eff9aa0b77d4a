//! The command line (docs/configuration.md, "Command line"): check, overrides, publish, version.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use support::*;

#[test]
fn check_prints_the_effective_default_config() {
    let (code, out, err) = run_cli(&["check", "-c", "conf/pollgate.yaml"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("url: memory://"), "{out}");
    assert!(out.contains("/sub/{channel}"), "{out}");
    assert!(out.contains("grace_period: 10s"), "{out}");
}

#[test]
fn check_names_file_key_path_and_reason_for_each_problem() {
    let f = temp_file(
        "bad.yaml",
        "routes:\n  - path: /x\n    subscribe:\n      channels: [a]\n      timout: 3s\n",
    );
    let (code, _, err) = run_cli(&["check", "-c", f.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(err.contains(f.to_str().unwrap()), "{err}");
    assert!(err.contains("routes[0].subscribe"), "{err}");
    assert!(err.contains("timout"), "{err}");

    let f = temp_file(
        "bad2.yaml",
        r#"
listen: "nowhere"
broker: {url: "kafka://x"}
limits: {max_channels: 1}
routes:
  - path: "/r/{room}"
    subscribe: {channels: ["room:{rom}", "x y"]}
  - path: "/p"
    upstream: missing
  - path: "no-slash"
    upstream: missing
"#,
    );
    let (code, _, err) = run_cli(&["check", "-c", f.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    let lines: Vec<&str> = err.lines().collect();
    for needle in [
        ": listen: 'nowhere'",
        ": broker.url: 'kafka://x'",
        ": routes[0].subscribe.channels: 2 channels, more than limits.max_channels",
        ": routes[0].subscribe.channels[0]: 'room:{rom}' uses {rom}",
        ": routes[0].subscribe.channels[1]: 'x y'",
        ": routes[1].upstream: no upstream named 'missing'",
        ": routes[2].path: 'no-slash' must start with '/'",
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(needle) && l.starts_with(f.to_str().unwrap())),
            "{needle} in:\n{err}"
        );
    }
}

#[test]
fn replicas_need_redis_and_the_sentinel_password_is_never_printed() {
    let f = temp_file("replicas.yaml", "publish:\n  replicas: 1\n");
    let (code, _, err) = run_cli(&["check", "-c", f.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("publish.replicas"), "{err}");
    let f = temp_file(
        "sentinel.yaml",
        "broker:\n  url: \"redis+sentinel://:data-pw@127.0.0.1:26379,127.0.0.1:26380/mymaster/0\"\n  \
         sentinel_password: \"sentinel-pw\"\npublish:\n  replicas: 1\n",
    );
    let (code, out, err) = run_cli(&["check", "-c", f.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains("data-pw") && !out.contains("sentinel-pw") && out.contains("***"),
        "{out}"
    );
    let f = temp_file(
        "nomaster.yaml",
        "broker:\n  url: \"redis+sentinel://:data-pw@127.0.0.1:26379\"\n",
    );
    let (code, _, err) = run_cli(&["check", "-c", f.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("broker.url") && err.contains("master") && !err.contains("data-pw"),
        "{err}"
    );
}

#[test]
fn check_reports_bad_units_and_unset_variables() {
    let f = temp_file("units.yaml", "limits:\n  max_body: 2 parsecs\n");
    let (code, _, err) = run_cli(&["check", "-c", f.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("limits.max_body") && err.contains("invalid size"),
        "{err}"
    );
    let f = temp_file(
        "env.yaml",
        "publish:\n  token: \"${POLLGATE_TEST_UNSET_VAR}\"\n",
    );
    let (code, _, err) = run_cli(&["check", "-c", f.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("POLLGATE_TEST_UNSET_VAR is not set"), "{err}");
    let (code, out, _) = run_cli(
        &["check", "-c", f.to_str().unwrap()],
        &[("POLLGATE_TEST_UNSET_VAR", "tok")],
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("token: '***'") && !out.contains("tok\n"),
        "secrets are not printed: {out}"
    );
    let (code, _, err) = run_cli(&["check", "-c", "/no/such/file.yaml"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("/no/such/file.yaml: cannot read"), "{err}");
}

#[test]
fn flags_and_environment_override_the_file() {
    let (code, out, _) = run_cli(
        &[
            "check",
            "-c",
            "conf/pollgate.yaml",
            "--listen",
            "0.0.0.0:1234",
        ],
        &[
            ("POLLGATE_BROKER", "redis://10.0.0.1:6379/0"),
            ("POLLGATE_ADMIN_LISTEN", "127.0.0.1:9999"),
        ],
    );
    assert_eq!(code, 0);
    assert!(out.contains("listen: 0.0.0.0:1234"), "{out}");
    assert!(out.contains("admin_listen: 127.0.0.1:9999"), "{out}");
    assert!(out.contains("url: redis://10.0.0.1:6379/0"), "{out}");
    let (code, _, err) = run_cli(
        &["check", "-c", "conf/pollgate.yaml"],
        &[("POLLGATE_LISTEN", "bad")],
    );
    assert_eq!(code, 2);
    assert!(err.contains("listen: 'bad'"), "{err}");
}

#[test]
fn version_and_help() {
    let (code, out, _) = run_cli(&["--version"], &[]);
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        format!("pollgate {}", env!("CARGO_PKG_VERSION"))
    );
    let (code, out, _) = run_cli(&["help"], &[]);
    assert_eq!(code, 0);
    for cmd in ["serve", "check", "publish"] {
        assert!(out.contains(cmd));
    }
}

#[test]
fn serve_refuses_an_invalid_config() {
    let f = temp_file("bad-serve.yaml", "threads: 0\n");
    let (code, _, err) = run_cli(&["serve", "-c", f.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("threads: must be at least 1"), "{err}");
}

#[tokio::test]
async fn publish_command_prints_the_id() {
    let pg = Pollgate::start_with_env(&format!("publish:\n  token: tok\n{ROUTES}"), &[]);
    let admin = pg.admin("");
    let (code, out, err) = run_cli(
        &[
            "publish", "--admin", &admin, "--token", "tok", "cli", "hello",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let id = out.trim().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pollgate"))
        .args(["publish", "--content-type", "application/json", "cli", "-"])
        .env("POLLGATE_ADMIN", &admin)
        .env("POLLGATE_TOKEN", "tok")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"from\":\"stdin\"}")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let (_, _, v) = get_json(&pg.url("/oldest/cli")).await;
    assert_eq!(v["messages"][0]["id"], id.as_str());
    assert_eq!(v["messages"][0]["data"], "hello");
    assert_eq!(v["messages"][1]["data"]["from"], "stdin");
    let (code, _, err) = run_cli(
        &["publish", "--admin", &admin, "--token", "nope", "cli", "x"],
        &[],
    );
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");
}

#[test]
fn check_and_serve_refuse_absurd_durations_naming_the_key() {
    // Past a year, any key: refused at parsing, with the key's path.
    for (yaml, key, value) in [
        ("grace_period: 9999999999s\n", "grace_period", "9999999999s"),
        (
            "routes:\n  - path: /x\n    subscribe:\n      channels: [a]\n      timeout: 500000000y\n",
            "routes[0].subscribe.timeout",
            "500000000y",
        ),
        (
            "upstreams:\n  app:\n    addrs: [\"127.0.0.1:1\"]\n    read_timeout: 400days\n",
            "upstreams.app.read_timeout",
            "400days",
        ),
    ] {
        let f = temp_file("absurd.yaml", yaml);
        let file = f.to_str().unwrap();
        for cmd in ["check", "serve"] {
            let (code, _, err) = run_cli(&[cmd, "-c", file], &[]);
            assert_eq!(code, 2, "{cmd} {yaml}: {err}");
            assert!(err.starts_with(&format!("{file}: {key}: ")), "{cmd}: {err}");
            let why = format!("'{value}' is longer than 365d, the longest duration allowed");
            assert!(err.contains(&why), "{cmd}: {err}");
        }
    }
    // Tighter bounds: a hold of more than a day, a keep-alive idle time
    // the kernel refuses; every problem is listed.
    let f = temp_file(
        "long.yaml",
        r#"
listener: {tcp_keepalive: 10h}
upstreams:
  app: {addrs: ["127.0.0.1:1"]}
routes:
  - path: /s
    subscribe: {channels: [a], timeout: 2days}
  - path: /w
    upstream: app
    watch: {channels: [b], timeout: 1day 1s}
"#,
    );
    let file = f.to_str().unwrap();
    for cmd in ["check", "serve"] {
        let (code, _, err) = run_cli(&[cmd, "-c", file], &[]);
        assert_eq!(code, 2, "{cmd}: {err}");
        for needle in [
            ": listener.tcp_keepalive: 36000s is longer than 32767s, the most allowed",
            ": routes[0].subscribe.timeout: 2d is longer than 1d, the most allowed",
            ": routes[1].watch.timeout: 86401s is longer than 1d, the most allowed",
        ] {
            assert!(
                err.contains(&format!("{file}{needle}")),
                "{cmd}: {needle} in {err}"
            );
        }
    }
}

/// Every duration at the longest it may be: the gateway serves (polls,
/// watch GETs, proxied requests) and drains without an overflowing
/// deadline.
#[tokio::test]
async fn the_longest_accepted_durations_serve_and_drain() {
    let legacy = support::legacy::Legacy::start(false).await;
    legacy.set("1", r#"{"id":1}"#);
    let year = "365d";
    let mut pg = Pollgate::start(&format!(
        r#"grace_period: {year}
listener: {{tcp_keepalive: 32767s, keepalive_timeout: {year}}}
broker: {{history_ttl: {year}}}
limits: {{header_timeout: {year}, write_timeout: {year}}}
upstreams:
  shop:
    addrs: ["127.0.0.1:{port}"]
    connect_timeout: {year}
    read_timeout: {year}
    health_check_interval: {year}
routes:
  - path: "/sub/{{channel}}"
    subscribe: {{channels: ["{{channel}}"], timeout: 1d, authorize_cache: {year}}}
  - path: "/orders/{{id}}"
    methods: [GET]
    upstream: shop
    watch: {{channels: ["order:{{id}}"], timeout: 1d, authorize_cache: {year}}}
  - path: "/orders/{{id}}"
    methods: [PUT]
    upstream: shop
    publish: {{channel: "order:{{id}}", body: none}}
"#,
        port = legacy.port
    ));
    let url = pg.url("/sub/long");
    let held = tokio::spawn(async move { client().get(url).send().await.unwrap() });
    pg.wait_metric("pollgate_held_requests", 1.0).await;
    pg.publish("long", "text/plain", "after all").await;
    let r = held.await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("after all"));

    let first = client().get(pg.url("/orders/1")).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let etag = first.headers()["etag"].to_str().unwrap().to_string();
    let url = pg.url("/orders/1");
    let held = tokio::spawn(async move {
        let r = client().get(url).header("If-None-Match", etag).send();
        r.await.unwrap()
    });
    pg.wait_metric("pollgate_held_watchers", 1.0).await;
    let put = client()
        .put(pg.url("/orders/1"))
        .body(r#"{"id":1,"v":2}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let r = held.await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), r#"{"id":1,"v":2}"#);

    pg.signal("-TERM");
    let status = pg.wait_exit(std::time::Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "drained and exited");
}

#[test]
fn check_refuses_listeners_on_one_address() {
    let (code, _, err) = run_cli(
        &["check", "-c", "conf/pollgate.yaml"],
        &[("POLLGATE_ADMIN_LISTEN", "127.0.0.1:8080")],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains(
            "conf/pollgate.yaml: admin_listen: '127.0.0.1:8080' takes the port of listen \
             ('127.0.0.1:8080')"
        ),
        "{err}"
    );
    // A wildcard takes the port on every address of its family; tls.listen
    // is checked against both.
    let pki = support::pki::pki();
    let (cert, key) = (temp_file("c.crt", ""), temp_file("c.key", ""));
    support::pki::install(&pki, &cert, &key);
    let tls = |addr: &str| {
        format!(
            "listen: \"127.0.0.1:8080\"\nadmin_listen: \"0.0.0.0:9090\"\n\
             publish: {{token: t}}\n\
             tls: {{listen: \"{addr}\", cert: \"{}\", key: \"{}\"}}\n",
            cert.display(),
            key.display()
        )
    };
    for (addr, other) in [
        ("0.0.0.0:8080", "listen ('127.0.0.1:8080')"),
        ("127.0.0.1:9090", "admin_listen ('0.0.0.0:9090')"),
    ] {
        let f = temp_file("tls-clash.yaml", &tls(addr));
        let file = f.to_str().unwrap();
        for cmd in ["check", "serve"] {
            let (code, _, err) = run_cli(&[cmd, "-c", file], &[]);
            assert_eq!(code, 2, "{cmd}: {err}");
            let want = format!("{file}: tls.listen: '{addr}' takes the port of {other}");
            assert!(err.contains(&want), "{cmd}: {want} in {err}");
        }
    }
    let f = temp_file("tls-ok.yaml", &tls("127.0.0.1:8443"));
    let (code, _, err) = run_cli(&["check", "-c", f.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
}

/// Under a hard open-file limit too low for `limits.max_held`, `serve`
/// says what it wanted and what it got (the limit read back), and serves.
#[test]
fn serve_reports_the_open_file_limit_it_could_not_reach() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let (port, admin) = (free_port(), free_port());
    let f = temp_file(
        "nofile.yaml",
        &format!(
            "listen: \"127.0.0.1:{port}\"\nadmin_listen: \"127.0.0.1:{admin}\"\n\
             threads: 1\nlimits: {{max_held: 100000}}\n"
        ),
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pollgate"));
    cmd.args(["serve", "--log-level", "warn", "-c", f.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only setrlimit, a system call, runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| rlimit::setrlimit(rlimit::Resource::NOFILE, 1024, 1024));
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let found = loop {
        match rx.recv_timeout(std::time::Duration::from_secs(10)) {
            Ok(line) if line.contains("cannot raise the open-file limit") => break Some(line),
            Ok(line) => seen.push(line),
            Err(_) => break None,
        }
    };
    let alive = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    let line = found.unwrap_or_else(|| panic!("no warning in {seen:#?}"));
    for field in ["wanted=100256", "limit=1024", "the hard limit is 1024"] {
        assert!(line.contains(field), "{field} in {line}");
    }
    assert!(alive, "it serves all the same");
}
