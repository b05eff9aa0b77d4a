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
