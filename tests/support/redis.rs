//! Real `redis-server` processes for tests, each on its own free port.
#![allow(dead_code)]

use super::free_port;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A redis-server child process; killed when dropped.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    args: Vec<String>,
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "pollgate-redis-{}-{tag}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The ```lua block of docs/redis.md, as a backend would copy it.
pub fn documented_script() -> String {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/redis.md")).unwrap();
    let start = doc.find("```lua\n").expect("docs/redis.md has a lua block") + 7;
    let end = start + doc[start..].find("```").unwrap();
    doc[start..end].to_string()
}

impl RedisServer {
    /// Publishes as a backend would, with redis-cli and the script of
    /// docs/redis.md only, under namespace `ns`; returns the message id.
    pub fn publish_raw(&self, ns: &str, channel: &str, content_type: &str, data: &str) -> String {
        let script = documented_script();
        let stream = format!("{ns}:{{{channel}}}:h");
        let floor = format!("{ns}:{{{channel}}}:f");
        let announce = format!("{ns}:{{{channel}}}");
        let out = self.cli(&[
            "EVAL",
            &script,
            "2",
            &stream,
            &floor,
            &announce,
            "100",
            "3600000",
            content_type,
            data,
            "PUBLISH",
        ]);
        let id = out.trim().to_string();
        assert!(id.contains('-'), "script answered {out:?}");
        id
    }

    /// A server that keeps nothing on disk: a restart comes back empty.
    pub fn start() -> RedisServer {
        Self::spawn_free(&["--appendonly", "no"], "plain")
    }

    /// Spawns on a free port, trying another when the port was taken meanwhile.
    fn spawn_free(extra: &[&str], tag: &str) -> RedisServer {
        for _ in 0..4 {
            if let Some(r) = Self::try_spawn(free_port(), extra, tag) {
                return r;
            }
        }
        Self::spawn(free_port(), extra, tag)
    }

    fn try_spawn(port: u16, extra: &[&str], tag: &str) -> Option<RedisServer> {
        let r = std::panic::catch_unwind(|| Self::spawn(port, extra, tag)).ok()?;
        Some(r)
    }

    /// A server with an fsync-always append-only file: a restart keeps data.
    pub fn start_persistent() -> RedisServer {
        Self::spawn(
            free_port(),
            &["--appendonly", "yes", "--appendfsync", "always"],
            "aof",
        )
    }

    /// A server on `port` with `extra` arguments, its files in a temp dir
    /// named after `tag`.
    pub fn spawn(port: u16, extra: &[&str], tag: &str) -> RedisServer {
        let dir = temp_dir(tag);
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(dir.display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut r = RedisServer {
            child: None,
            port,
            dir,
            args,
        };
        r.launch();
        r
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/deps installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.cli(&["PING"]).trim() == "PONG" {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("redis-server on {} exited at start: {status}", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on {} did not start", self.port);
    }

    /// `redis://127.0.0.1:<port>/0`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Runs `redis-cli -p <port> args...`; returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli must be installed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sends `signal` (e.g. `-STOP`, `-CONT`) to the server process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        Command::new("kill").args([signal, &pid]).status().unwrap();
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same files.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port whose cluster bus port (+10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let p = free_port();
        if p < 55000 && TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
            return p;
        }
    }
}

/// A 3-master Redis Cluster on loopback.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|i| {
                let port = cluster_port();
                let conf = format!("nodes-{port}.conf");
                RedisServer::spawn(
                    port,
                    &[
                        "--appendonly",
                        "no",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &conf,
                    ],
                    &format!("cluster{i}"),
                )
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !nodes
            .iter()
            .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(Instant::now() < deadline, "cluster did not become ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        RedisCluster { nodes }
    }

    /// `redis+cluster://h1:p1,h2:p2,h3:p3`
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }
}
