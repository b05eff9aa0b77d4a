//! A Redis watched by Sentinel, as real processes: a master, one replica
//! (`--replicaof`) and three sentinels (`redis-server FILE --sentinel`, each
//! with its own writable config file), quorum 2, a master declared down
//! after 1 s. Failovers by SIGKILL of the master (the replica caught up, or
//! left behind: its link through a [`Proxy`] stalled and cut) or `SENTINEL
//! FAILOVER`.
#![allow(dead_code)]

use super::free_port;
use super::proxy::Proxy;
use super::redis::RedisServer;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The master's name the sentinels monitor.
pub const MASTER: &str = "mymaster";

/// Master, replica and sentinels; all killed when dropped.
pub struct SentinelRedis {
    /// The two data servers; which one is master changes with failovers.
    pub servers: Vec<RedisServer>,
    sentinels: Vec<(Child, u16)>,
    dir: PathBuf,
    /// The replica's link to the master, when it goes through a proxy.
    link: Option<Proxy>,
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli must be installed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl SentinelRedis {
    /// Starts master, replica and sentinels, and waits until the sentinels
    /// know the replica and each other.
    pub fn start() -> SentinelRedis {
        Self::start_with(false)
    }

    /// As [`SentinelRedis::start`], the replica replicating through a
    /// proxy (see [`SentinelRedis::kill_master_with_replica_behind`]). The
    /// sentinels' failover timeout is then 60 s, the time they would wait
    /// before pointing the replica at the master's own address.
    pub fn start_with_replica_link() -> SentinelRedis {
        Self::start_with(true)
    }

    fn start_with(proxied: bool) -> SentinelRedis {
        let master = RedisServer::spawn(free_port(), &["--appendonly", "no"], "smaster");
        let mport = master.port.to_string();
        let link = proxied.then(|| Proxy::start(master.port));
        let via = link.as_ref().map_or(mport.clone(), |p| p.port.to_string());
        let failover_timeout = if proxied { 60_000 } else { 5000 };
        let replica = RedisServer::spawn(
            free_port(),
            &["--appendonly", "no", "--replicaof", "127.0.0.1", &via],
            "sreplica",
        );
        wait_for("the replica syncs", Duration::from_secs(10), || {
            replica
                .cli(&["INFO", "replication"])
                .contains("master_link_status:up")
        });
        let dir = std::env::temp_dir().join(format!(
            "pollgate-sentinel-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let sentinels = (0..3)
            .map(|i| {
                let port = free_port();
                let file = dir.join(format!("sentinel{i}.conf"));
                std::fs::write(
                    &file,
                    format!(
                        "port {port}\nbind 127.0.0.1\ndir {}\n\
                         sentinel monitor {MASTER} 127.0.0.1 {mport} 2\n\
                         sentinel down-after-milliseconds {MASTER} 2000\n\
                         sentinel failover-timeout {MASTER} {failover_timeout}\n\
                         sentinel parallel-syncs {MASTER} 1\n",
                        dir.display()
                    ),
                )
                .unwrap();
                let child = Command::new("redis-server")
                    .arg(&file)
                    .arg("--sentinel")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-server must be installed");
                (child, port)
            })
            .collect::<Vec<_>>();
        let s = SentinelRedis {
            servers: vec![master, replica],
            sentinels,
            dir,
            link,
        };
        for &(_, port) in &s.sentinels {
            wait_for(
                "a sentinel knows its peers",
                Duration::from_secs(15),
                || {
                    let replicas = cli(port, &["SENTINEL", "REPLICAS", MASTER]);
                    let peers = cli(port, &["SENTINEL", "SENTINELS", MASTER]);
                    replicas.contains("slave") && peers.matches("sentinel").count() >= 2
                },
            );
        }
        s
    }

    /// `redis+sentinel://127.0.0.1:s1,127.0.0.1:s2,127.0.0.1:s3/mymaster/0`
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|(_, p)| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+sentinel://{}/{MASTER}/0", hosts.join(","))
    }

    /// The port of the master the sentinels name now.
    pub fn master_port(&self) -> u16 {
        let out = cli(
            self.sentinels[0].1,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER],
        );
        out.lines()
            .nth(1)
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The data server that is master now.
    fn master_index(&self) -> usize {
        let port = self.master_port();
        self.servers
            .iter()
            .position(|s| s.port == port)
            .expect("the sentinels name one of the servers")
    }

    /// SIGKILLs the master, waits until the sentinels name the other
    /// server, then starts the killed one again (empty): the sentinels
    /// make it a replica of the new master. Returns once it replicates.
    pub fn kill_master(&mut self) {
        let old = self.master_index();
        let old_port = self.servers[old].port;
        self.servers[old].kill();
        wait_for("the sentinels fail over", Duration::from_secs(20), || {
            let p = self.master_port();
            p != 0 && p != old_port
        });
        self.restart_empty(old);
    }

    /// The replica falls behind, then the master is SIGKILLed: the
    /// replica's link (see [`SentinelRedis::start_with_replica_link`])
    /// passes nothing for `behind`, while the master goes on acknowledging
    /// writes; the master is killed and the link cut with what it held, and
    /// the sentinels promote the replica without those writes. Then as
    /// [`SentinelRedis::kill_master`].
    pub fn kill_master_with_replica_behind(&mut self, behind: Duration) {
        let link = self.link.as_ref().expect("started with a replica link");
        let old = self.master_index();
        let old_port = self.servers[old].port;
        link.stall(Duration::from_secs(3600));
        std::thread::sleep(behind);
        self.servers[old].kill();
        link.cut(Duration::from_secs(3600));
        wait_for("the sentinels fail over", Duration::from_secs(20), || {
            let p = self.master_port();
            p != 0 && p != old_port
        });
        self.restart_empty(old);
    }

    /// `SENTINEL FAILOVER`: the replica becomes master, the master a
    /// replica. Returns once the old master replicates from the new one.
    pub fn failover(&self) {
        let old = self.master_index();
        let old_port = self.servers[old].port;
        let out = cli(self.sentinels[0].1, &["SENTINEL", "FAILOVER", MASTER]);
        assert!(out.contains("OK"), "SENTINEL FAILOVER: {out}");
        wait_for("the sentinels fail over", Duration::from_secs(20), || {
            let p = self.master_port();
            p != 0 && p != old_port
        });
        self.rejoin(old);
    }

    /// Restarts server `i`, which comes back without its data, and makes it
    /// a replica of the new master. It is never to be promoted (priority
    /// 0): on a busy machine the sentinels may think the new master down
    /// for a moment, and promoting an empty server would lose everything.
    fn restart_empty(&mut self, i: usize) {
        self.servers[i].restart();
        self.servers[i].cli(&["CONFIG", "SET", "replica-priority", "0"]);
        self.rejoin(i);
    }

    /// Makes server `i` a replica of the new master and waits until it
    /// replicates. The sentinels would do the same, but only once it has
    /// reported the wrong role for 8 s and they next read its INFO (every
    /// 10 s): the test does not wait that long.
    fn rejoin(&self, i: usize) {
        let new = self.master_port().to_string();
        wait_for(
            "the old master replicates the new one",
            Duration::from_secs(30),
            || {
                let info = self.servers[i].cli(&["INFO", "replication"]);
                if !info.contains(&format!("master_port:{new}")) {
                    // Again until it takes: a server just restarted may
                    // not have been listening yet on a busy machine.
                    self.servers[i].cli(&["REPLICAOF", "127.0.0.1", &new]);
                    return false;
                }
                info.contains("master_link_status:up")
            },
        );
    }
}

impl Drop for SentinelRedis {
    fn drop(&mut self) {
        for (child, _) in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
