//! A fleet for fault tests: several pollgate instances on one Redis (a
//! redis-server it owns, or any broker URL: Sentinel, Cluster),
//! and the [`Directory`] through which clients find them (what a load
//! balancer knows: the ports of the live instances). Instances can be
//! SIGKILLed or restarted with SIGTERM, and Redis killed and restarted; the
//! async methods run their blocking steps off the async workers, so that
//! the test's traffic keeps flowing meanwhile.
#![allow(dead_code)]

use super::redis::RedisServer;
use super::{with_broker, Pollgate, ROUTES};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::task::block_in_place;

/// An instance's two listeners.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub client: u16,
    pub admin: u16,
}

/// The live instances, by index; `None` while one is out.
#[derive(Clone, Default)]
pub struct Directory(Arc<RwLock<Vec<Option<Ports>>>>);

impl Directory {
    fn set(&self, i: usize, pg: Option<&Pollgate>) {
        let ports = pg.map(|pg| Ports {
            client: pg.port,
            admin: pg.admin_port,
        });
        let mut all = self.0.write().unwrap();
        if all.len() <= i {
            all.resize(i + 1, None);
        }
        all[i] = ports;
    }

    /// Number of places (live or not).
    pub fn len(&self) -> usize {
        self.0.read().unwrap().len()
    }

    /// The first live instance at or after `i`, going round: its index and
    /// ports.
    pub fn pick(&self, i: usize) -> Option<(usize, Ports)> {
        let all = self.0.read().unwrap();
        (0..all.len())
            .map(|k| (i + k) % all.len())
            .find_map(|j| all[j].map(|p| (j, p)))
    }
}

/// Instances on one Redis; everything is killed when dropped.
pub struct Fleet {
    /// The redis-server the fleet owns, when it owns one.
    pub redis: Option<RedisServer>,
    instances: Vec<Option<Pollgate>>,
    configs: Vec<String>,
    pub directory: Directory,
}

/// The instances' configuration: a history long enough that no subscriber
/// falls out of it during a test, and a short drain.
fn config(broker_url: &str, extra: &str) -> String {
    with_broker(
        &format!("grace_period: 2s\nbroker:\n  history: 1000\n{extra}{ROUTES}"),
        broker_url,
    )
}

fn start_ready(config: &str) -> Pollgate {
    let pg = Pollgate::start(config);
    pg.wait_ready();
    pg
}

impl Fleet {
    /// `n` instances on `redis`, ready.
    pub fn start(redis: RedisServer, n: usize) -> Fleet {
        let url = redis.url();
        Self::start_via(redis, vec![url; n])
    }

    /// One instance per broker URL (each reaches `redis`, directly or
    /// through a proxy), ready.
    pub fn start_via(redis: RedisServer, broker_urls: Vec<String>) -> Fleet {
        let mut fleet = Self::start_on(&broker_urls, "");
        fleet.redis = Some(redis);
        fleet
    }

    /// One instance per broker URL, with `extra` top-level YAML (e.g. a
    /// `publish:` block), ready; the fleet owns no Redis.
    pub fn start_on(broker_urls: &[String], extra: &str) -> Fleet {
        let configs: Vec<String> = broker_urls.iter().map(|u| config(u, extra)).collect();
        let instances: Vec<Option<Pollgate>> =
            configs.iter().map(|c| Some(start_ready(c))).collect();
        let directory = Directory::default();
        for (i, pg) in instances.iter().enumerate() {
            directory.set(i, pg.as_ref());
        }
        Fleet {
            redis: None,
            instances,
            configs,
            directory,
        }
    }

    /// Instance `i`, running.
    pub fn instance(&self, i: usize) -> &Pollgate {
        self.instances[i].as_ref().expect("instance is running")
    }

    /// SIGKILLs instance `i`; clients stop finding it.
    pub async fn kill(&mut self, i: usize) {
        let mut pg = self.instances[i].take().expect("instance is running");
        block_in_place(|| pg.kill());
        self.directory.set(i, None);
    }

    /// Restarts instance `i` gracefully: SIGTERM (it drains, answering its
    /// held polls, and exits 0), then a new instance with the same
    /// configuration takes its place (on new ports) once ready.
    pub async fn restart(&mut self, i: usize) {
        let mut old = self.instances[i].take().expect("instance is running");
        old.signal("-TERM");
        let status = block_in_place(|| old.wait_exit(Duration::from_secs(10)));
        assert!(
            status.is_some_and(|s| s.success()),
            "instance {i} did not drain and exit 0: {status:?}"
        );
        self.directory.set(i, None);
        let new = block_in_place(|| start_ready(&self.configs[i]));
        self.directory.set(i, Some(&new));
        self.instances[i] = Some(new);
    }

    /// SIGKILLs redis-server, leaves it down for `outage`, starts it again
    /// (same port, same files) and waits until every instance is ready.
    pub async fn redis_outage(&mut self, outage: Duration) {
        let redis = self
            .redis
            .as_mut()
            .expect("the fleet owns its redis-server");
        block_in_place(|| redis.kill());
        tokio::time::sleep(outage).await;
        block_in_place(|| redis.restart());
        self.wait_ready().await;
    }

    /// Waits until every running instance answers /readyz with 200.
    pub async fn wait_ready(&self) {
        block_in_place(|| {
            self.instances
                .iter()
                .flatten()
                .for_each(|pg| pg.wait_ready())
        });
    }
}
