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

fn cluster_wait(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Redis Cluster on loopback: 3 masters, or 3 masters and 3 replicas.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let cluster = Self::create(3, 0, &[]);
        cluster.wait_ok();
        cluster
    }

    /// Six nodes, three masters with a replica each (`--cluster-replicas
    /// 1`), a node declared failed after 1 s (`cluster-node-timeout`).
    /// Returns once every node says `cluster_state:ok` and every master has
    /// its replica connected.
    pub fn start_with_replicas() -> RedisCluster {
        let cluster = Self::create(6, 1, &["--cluster-node-timeout", "1000"]);
        cluster.wait_ok();
        cluster.wait_replicated();
        cluster
    }

    fn create(n: usize, replicas: usize, extra: &[&str]) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..n)
            .map(|i| {
                let port = cluster_port();
                let conf = format!("nodes-{port}.conf");
                let mut args = vec![
                    "--appendonly",
                    "no",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                ];
                args.extend_from_slice(extra);
                RedisServer::spawn(port, &args, &format!("cluster{i}"))
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        RedisCluster { nodes }
    }

    /// The nodes running now.
    fn live(&self) -> impl Iterator<Item = &RedisServer> {
        self.nodes.iter().filter(|n| n.child.is_some())
    }

    /// Waits until every running node says `cluster_state:ok`.
    pub fn wait_ok(&self) {
        cluster_wait("the cluster is ok", || {
            self.live()
                .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        });
    }

    /// Waits until every master that serves slots has a replica online
    /// and every replica's link to its master is up.
    pub fn wait_replicated(&self) {
        cluster_wait("every master has its replica", || {
            self.live().all(|n| {
                let info = n.cli(&["INFO", "replication"]);
                if info.contains("role:slave") {
                    info.contains("master_link_status:up")
                } else {
                    !n.cli(&["CLUSTER", "NODES"])
                        .lines()
                        .any(|l| l.contains("myself") && l.split(' ').count() > 8)
                        || (info.contains("connected_slaves:1") && info.contains("state=online"))
                }
            })
        });
    }

    /// The Cluster slot of `key`.
    pub fn keyslot(&self, key: &str) -> u16 {
        let node = self.live().next().expect("a node runs");
        node.cli(&["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .expect("CLUSTER KEYSLOT answers a number")
    }

    /// The master that serves `slot` now, as a running node sees it: its
    /// index in `nodes` and its node id. None while no healthy master does.
    pub fn owner(&self, slot: u16) -> Option<(usize, String)> {
        let node = self.live().next()?;
        for line in node.cli(&["CLUSTER", "NODES"]).lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let serves = f[8..].iter().any(|r| {
                if r.starts_with('[') {
                    return false;
                }
                let (a, b) = r.split_once('-').unwrap_or((r, r));
                let (a, b): (u16, u16) = (a.parse().unwrap_or(1), b.parse().unwrap_or(0));
                (a..=b).contains(&slot)
            });
            if serves {
                let port: u16 = f[1].split([':', '@']).nth(1)?.parse().ok()?;
                let i = self.nodes.iter().position(|n| n.port == port)?;
                return Some((i, f[0].to_string()));
            }
        }
        None
    }

    /// Per running node: port, role and the shard subscribers of `names`.
    pub fn describe(&self, names: &[&str]) -> String {
        self.live()
            .map(|n| {
                let role = n.cli(&["ROLE"]).lines().next().unwrap_or("").to_string();
                let mut args = vec!["PUBSUB", "SHARDNUMSUB"];
                args.extend_from_slice(names);
                let subs = n.cli(&args).replace('\n', " ");
                format!("{} {role}: {subs}", n.port)
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The node id of `nodes[i]`.
    pub fn id(&self, i: usize) -> String {
        self.nodes[i].cli(&["CLUSTER", "MYID"]).trim().to_string()
    }

    /// The masters serving slots, by index.
    pub fn masters(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| {
                self.nodes[i].child.is_some()
                    && self.nodes[i]
                        .cli(&["CLUSTER", "NODES"])
                        .lines()
                        .any(|l| l.contains("myself,master") && l.split(' ').count() > 8)
            })
            .collect()
    }

    /// SIGKILLs the master of `slot`, waits until its replica took the
    /// slot over and the cluster is ok, then starts the killed node again
    /// (empty, with its nodes file: it rejoins as the new master's replica)
    /// and waits until it replicates. Returns the time the failover took.
    pub fn kill_owner(&mut self, slot: u16) -> Duration {
        let started = Instant::now();
        let (old, _) = self.owner(slot).expect("the slot has a master");
        self.nodes[old].kill();
        cluster_wait("a replica takes the slot over", || {
            self.owner(slot).is_some_and(|(i, _)| i != old)
        });
        self.wait_ok();
        let failed_over = started.elapsed();
        self.nodes[old].restart();
        self.wait_ok();
        self.wait_replicated();
        failed_over
    }

    /// Moves `slot` from its master to another one, as `redis-cli
    /// --cluster reshard` does: IMPORTING on the target, MIGRATING on the
    /// source, every key `MIGRATE`d, then `SETSLOT NODE` on every master.
    pub fn migrate(&self, slot: u16) {
        let (src, src_id) = self.owner(slot).expect("the slot has a master");
        let dst = *self
            .masters()
            .iter()
            .find(|&&i| i != src)
            .expect("another master");
        let dst_id = self.id(dst);
        let s = slot.to_string();
        let ok = |out: String, what: &str| assert!(out.contains("OK"), "{what}: {out}");
        ok(
            self.nodes[dst].cli(&["CLUSTER", "SETSLOT", &s, "IMPORTING", &src_id]),
            "IMPORTING",
        );
        ok(
            self.nodes[src].cli(&["CLUSTER", "SETSLOT", &s, "MIGRATING", &dst_id]),
            "MIGRATING",
        );
        let dst_port = self.nodes[dst].port.to_string();
        loop {
            let keys = self.nodes[src].cli(&["CLUSTER", "GETKEYSINSLOT", &s, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["MIGRATE", "127.0.0.1", &dst_port, "", "0", "5000", "KEYS"];
            args.extend(keys);
            ok(self.nodes[src].cli(&args), "MIGRATE");
        }
        for i in std::iter::once(dst)
            .chain(std::iter::once(src))
            .chain(self.masters())
        {
            ok(
                self.nodes[i].cli(&["CLUSTER", "SETSLOT", &s, "NODE", &dst_id]),
                "SETSLOT NODE",
            );
        }
        cluster_wait("the slot is the target's", || {
            self.owner(slot).is_some_and(|(i, _)| i == dst)
        });
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
