//! Test harness: starts a real `pollgate serve` on free ports with a config
//! written for the test (on the memory broker or a real `redis-server`), and
//! talks to it over HTTP.
#![allow(dead_code)]

pub mod backend;
pub mod example;
pub mod fleet;
pub mod h2c;
pub mod hooks;
pub mod legacy;
pub mod pki;
pub mod proxy;
pub mod rawbackend;
pub mod redis;
pub mod sentinel;
pub mod traffic;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Whether process `pid` has a listening TCP socket on `port` (from
/// /proc/net/tcp and the process's fds).
pub fn listens_on(pid: u32, port: u16) -> bool {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let suffix = format!(":{port:04X}");
    let inodes: Vec<String> = tcp
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() > 9 && f[1].ends_with(&suffix) && f[3] == "0A").then(|| f[9].to_string())
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            let t = target.to_string_lossy();
            inodes.iter().any(|i| t == format!("socket:[{i}]"))
        })
    })
}

/// The message ids of a cursor, without its epoch (`<ids>_<epoch>`): what
/// tests compare with the ids a publish returned.
pub fn position(cursor: &str) -> &str {
    cursor.split('_').next().unwrap_or(cursor)
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A file in the temp dir, unique to this test process.
pub fn temp_file(name: &str, contents: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "pollgate-test-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, contents).unwrap();
    path
}

/// Runs the pollgate binary with `args`, returning (status, stdout, stderr).
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pollgate"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running gateway; killed when dropped.
pub struct Pollgate {
    child: Option<Child>,
    pub port: u16,
    pub admin_port: u16,
    pub config: PathBuf,
    /// The Redis server this gateway owns (see [`Pollgate::start_on`]).
    pub redis: Option<redis::RedisServer>,
    /// The file its stderr goes to (see [`Pollgate::start_logged`]).
    pub log: Option<PathBuf>,
}

/// Which broker a behavioural test runs against.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Memory,
    Redis,
}

/// `body` with `broker.url` set to `url` (merged into a `broker:` block).
pub fn with_broker(body: &str, url: &str) -> String {
    let line = format!("broker:\n  url: \"{url}\"\n");
    if body.contains("broker:\n") {
        body.replacen("broker:\n", &line, 1)
    } else {
        format!("{line}{body}")
    }
}

/// The routes most tests use, on top of the listener lines.
pub const ROUTES: &str = r#"
routes:
  - path: "/sub/{channel}"
    methods: [GET]
    subscribe:
      channels: ["{channel}"]
      timeout: 10s
  - path: "/oldest/{channel}"
    subscribe:
      channels: ["{channel}"]
      first: oldest
  - path: "/raw/{channel}"
    subscribe:
      channels: ["{channel}"]
      format: raw
      timeout: 10s
  - path: "/multi/{a}/{b}"
    subscribe:
      channels: ["a:{a}", "b:{b}"]
      timeout: 10s
"#;

impl Pollgate {
    /// Starts pollgate on `backend`: for Redis, with its own fresh server.
    pub fn start_on(backend: Backend, body: &str) -> Pollgate {
        match backend {
            // One worker thread on the memory broker (as benchmarked), two
            // on Redis: a test run on both brokers runs on both counts.
            Backend::Memory if !body.contains("threads:") => {
                Self::start(&format!("threads: 1\n{body}"))
            }
            Backend::Memory => Self::start(body),
            Backend::Redis => {
                let r = redis::RedisServer::start();
                let mut pg = Self::start(&with_broker(body, &r.url()));
                pg.wait_ready();
                pg.redis = Some(r);
                pg
            }
        }
    }

    /// Waits until /readyz answers 200.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let mut s = TcpStream::connect(("127.0.0.1", self.admin_port)).unwrap();
            let (status, _, _) = raw_exchange(&mut s, "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n");
            if status.contains("200") {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("pollgate did not become ready");
    }

    /// Starts pollgate with `body` appended to generated listen lines.
    pub fn start(body: &str) -> Pollgate {
        Self::start_with_env(body, &[])
    }

    /// Like [`Pollgate::start`] with extra environment variables.
    pub fn start_with_env(body: &str, env: &[(&str, &str)]) -> Pollgate {
        Self::start_inner(body, env, false)
    }

    /// Like [`Pollgate::start`], with the process's stderr written to a
    /// file that [`Pollgate::logs`] reads (a panic is printed there).
    pub fn start_logged(body: &str) -> Pollgate {
        Self::start_inner(body, &[], true)
    }

    /// What the process wrote to stderr so far (empty unless started with
    /// [`Pollgate::start_logged`]).
    pub fn logs(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Panics when the process's stderr shows a panic (a task of a request
    /// that panicked).
    pub fn assert_no_panic(&self) {
        let logs = self.logs();
        assert!(!logs.contains("panicked"), "pollgate panicked:\n{logs}");
    }

    fn start_inner(body: &str, env: &[(&str, &str)], logged: bool) -> Pollgate {
        // A port picked free can be taken before pollgate binds it: retry.
        let mut last = String::new();
        for _ in 0..5 {
            match Self::try_start(body, env, logged) {
                Ok(pg) => return pg,
                Err(e) => last = e,
            }
        }
        panic!("pollgate did not start: {last}");
    }

    fn try_start(body: &str, env: &[(&str, &str)], logged: bool) -> Result<Pollgate, String> {
        let port = free_port();
        let admin_port = free_port();
        let threads = if body.contains("threads:") {
            ""
        } else {
            "threads: 2\n"
        };
        let yaml = format!(
            "listen: \"127.0.0.1:{port}\"\nadmin_listen: \"127.0.0.1:{admin_port}\"\n{threads}{body}"
        );
        let config = temp_file("pollgate.yaml", &yaml);
        let log = logged.then(|| temp_file("pollgate.log", ""));
        let stderr = match &log {
            Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
            None => Stdio::inherit(),
        };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pollgate"));
        cmd.args(["serve", "-c"])
            .arg(&config)
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let mut pg = Pollgate {
            child: Some(child),
            port,
            admin_port,
            config,
            redis: None,
            log,
        };
        pg.wait_until_up()?;
        Ok(pg)
    }

    fn wait_until_up(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Err(format!("pollgate exited at start: {status}"));
            }
            // Its own sockets: a port picked free may have been taken by
            // another test's process, which would answer in its place.
            let pid = self.pid();
            if listens_on(pid, self.admin_port) && listens_on(pid, self.port) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Err("pollgate did not start listening".into())
    }

    /// `http://127.0.0.1:<port><path>` on the client listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `http://127.0.0.1:<admin_port><path>` on the admin listener.
    pub fn admin(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// Publishes `data` as `content_type`; returns the id.
    pub async fn publish(&self, channel: &str, content_type: &str, data: &str) -> String {
        let started = Instant::now();
        let sent = client()
            .post(self.admin(&format!("/v1/publish/{channel}")))
            .header("Content-Type", content_type)
            .body(data.to_string())
            .send()
            .await;
        // A publish that fails in transit says how long it took and what
        // the kernel held on the admin port's connections then (a 6 MB
        // publish once failed with ETIMEDOUT on a loaded machine).
        let r = sent.unwrap_or_else(|e| {
            let port = self.admin_port;
            let filter = format!("( sport = :{port} or dport = :{port} )");
            let ss = Command::new("ss").args(["-tmi", &filter]).output();
            let ss = ss.map_or(String::new(), |o| {
                String::from_utf8_lossy(&o.stdout).into_owned()
            });
            panic!(
                "publish of {} bytes to {channel} failed after {:?}: {e:?}\n{ss}",
                data.len(),
                started.elapsed()
            )
        });
        assert_eq!(r.status(), 200, "publish to {channel}");
        let v: serde_json::Value = r.json().await.unwrap();
        v["id"].as_str().unwrap().to_string()
    }

    /// The value of a metric line (first sample whose name and labels start
    /// with `prefix`).
    pub async fn metric(&self, prefix: &str) -> f64 {
        let text = get_text(&self.admin("/metrics")).await;
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {prefix}"))
    }

    /// Polls `metric` until it equals `want` (or panics after 5 s).
    pub async fn wait_metric(&self, prefix: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.metric(prefix).await;
            if got == want {
                return;
            }
            assert!(Instant::now() < deadline, "{prefix} is {got}, want {want}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One raw HTTP/1.x request on a fresh connection to the client
    /// listener: the answer's status code and JSON body (Null if none).
    pub fn raw(&self, request: &str) -> (u16, serde_json::Value) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (status, _, body) = raw_exchange(&mut s, request);
        let code = status.split(' ').nth(1).unwrap().parse().unwrap();
        (
            code,
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        Command::new("kill").args([sig, &pid]).status().unwrap();
    }

    /// Waits for the process to exit (at most `limit`).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().unwrap();
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Pollgate {
    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Pollgate {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.config);
        if let Some(log) = &self.log {
            let _ = std::fs::remove_file(log);
        }
    }
}

/// Generates one `#[tokio::test]` per backend for each listed
/// `async fn name(backend: Backend)`, in modules `memory` and `redis`, so
/// that both brokers pass the same behavioural suite.
#[macro_export]
macro_rules! on_both_brokers {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test] async fn $name() { super::$name($crate::support::Backend::Memory).await })*
        }
        mod redis {
            $(#[tokio::test] async fn $name() { super::$name($crate::support::Backend::Redis).await })*
        }
    };
}

/// An HTTP client with no connection reuse surprises.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().build().unwrap()
}

/// GETs `url` and returns its body as text.
pub async fn get_text(url: &str) -> String {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The message ids of an envelope, in order.
pub fn ids(v: &serde_json::Value) -> Vec<String> {
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// GETs `url` and returns (status, headers, JSON body or Null).
pub async fn get_json(url: &str) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
    let r = client().get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.bytes().await.unwrap();
    let v = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, headers, v)
}

/// Writes a raw HTTP/1.1 request on `stream` and reads one answer:
/// (status line, headers lowercased, body by Content-Length).
pub fn raw_exchange(
    stream: &mut TcpStream,
    request: &str,
) -> (String, Vec<(String, String)>, Vec<u8>) {
    stream.write_all(request.as_bytes()).unwrap();
    read_answer(stream)
}

/// Reads one HTTP/1.1 answer with a Content-Length body.
pub fn read_answer(stream: &mut TcpStream) -> (String, Vec<(String, String)>, Vec<u8>) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).unwrap();
        assert!(n > 0, "connection closed before the answer's head");
        buf.push(byte[0]);
    }
    let (status, headers, len) = answer_head(&String::from_utf8(buf).unwrap());
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).unwrap();
    (status, headers, body)
}

/// An HTTP/1 answer's head as text: its status line, its header fields
/// (names lowercased) and the `Content-Length` of its body (0 without).
pub fn answer_head(head: &str) -> (String, Vec<(String, String)>, usize) {
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().to_string();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap());
    (status, headers, len)
}
