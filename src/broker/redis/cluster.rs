//! Sharded pub/sub on a Redis Cluster (Redis >= 7): the broker's own
//! connection to each master that holds its `SSUBSCRIBE`s, and the slot
//! map it reads itself, so that it always knows where each watched
//! channel's subscription is.
//!
//! Pushes alone cannot be trusted for this. After a failover, the old
//! master restarted with its nodes file claims its slots until it learns
//! the new configuration epoch, and a subscription made there in the
//! meantime stops receiving anything without a `SUNSUBSCRIBE` reaching the
//! client. So [`Shards::check`] runs after any sign of change and about
//! once a second: it reads every node's `CLUSTER NODES` (`slots.rs`: a
//! slot belongs to the master that claims it with the highest
//! configuration epoch, as Redis itself decides) and counts each
//! subscription connection's shard channels on its node (`CLIENT LIST ID`,
//! field `ssub`).
//! [`Shards::misplaced`] then names the watched channels whose
//! subscription is missing or on another node than their slot's master;
//! the broker subscribes them again there ([`Shards::subscribe`]) and
//! catches each one up from its stream, read on that very node after the
//! subscription ([`Shards::link`]), so that nothing published in between
//! is missed.

use super::conn::{slot, Conn, Origin, PushQueue};
use super::slots::{Addr, SlotMap};
use super::RedisBroker;
use redis::aio::MultiplexedConnection;
use redis::{ConnectionAddr, ConnectionInfo, PushInfo, PushKind, RedisResult};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// Connect and response timeout of the node connections.
const NODE_TIMEOUT: Duration = Duration::from_secs(1);
/// Least time between two warnings of failed subscriptions.
const WARN_EVERY: Duration = Duration::from_secs(5);

/// A subscription connection to one node.
struct Sub {
    conn: MultiplexedConnection,
    serial: u64,
    /// Its `CLIENT ID` on the node.
    id: i64,
    /// The shard channels subscribed on it (announcement names).
    names: HashSet<String>,
}

/// Where a watched channel's subscription is.
struct Placed {
    name: String,
    addr: Addr,
}

/// The shard subscriptions of one broker connection.
pub struct Shards {
    /// Credentials and TLS settings of every node connection.
    template: ConnectionInfo,
    /// The nodes of `broker.url`, always asked for their view.
    seeds: Vec<Addr>,
    queue: PushQueue,
    /// Command connections (views, counts, catch-up reads), by node.
    links: HashMap<Addr, MultiplexedConnection>,
    subs: HashMap<Addr, Sub>,
    /// By channel.
    placed: HashMap<String, Placed>,
    map: SlotMap,
    /// A subscription or a node connection was lost: check soon.
    dirty: bool,
    /// When a failure (a subscription, or reading the slot map) was last
    /// logged as a warning.
    warned: Option<Instant>,
    /// Subscription connections made so far.
    serial: u64,
    /// Nodes that could not be reached since the last check: not tried
    /// again for each of their channels.
    unreachable: HashSet<Addr>,
}

fn addr_of(info: &ConnectionInfo) -> Option<Addr> {
    match &info.addr {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            Some(format!("{host}:{port}").into())
        }
        ConnectionAddr::Unix(_) => None,
    }
}

fn failed(what: &'static str, detail: String) -> redis::RedisError {
    (redis::ErrorKind::ClusterConnectionNotFound, what, detail).into()
}

impl Shards {
    /// Shard subscriptions on the cluster of `seeds` (at least one), their
    /// pushes tagged with their node and sent to `queue`.
    pub fn new(seeds: &[ConnectionInfo], queue: PushQueue) -> Option<Shards> {
        Some(Shards {
            template: seeds.first()?.clone(),
            seeds: seeds.iter().filter_map(addr_of).collect(),
            queue,
            links: HashMap::new(),
            subs: HashMap::new(),
            placed: HashMap::new(),
            map: SlotMap::default(),
            dirty: false,
            warned: None,
            serial: 0,
            unreachable: HashSet::new(),
        })
    }

    /// The connection settings of the node at `addr`.
    fn info(&self, addr: &str) -> RedisResult<ConnectionInfo> {
        let (host, port) = addr
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
            .ok_or_else(|| failed("bad cluster node address", addr.to_string()))?;
        let mut info = self.template.clone();
        info.addr = match &self.template.addr {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host, port),
        };
        Ok(info)
    }

    async fn connect(
        info: ConnectionInfo,
        pushes: Option<PushQueue>,
    ) -> RedisResult<MultiplexedConnection> {
        let mut config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(NODE_TIMEOUT)
            .set_response_timeout(NODE_TIMEOUT);
        if let Some(pushes) = pushes {
            config = config.set_push_sender(pushes);
        }
        redis::Client::open(info)?
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// The command connection to `addr`, made when missing: catch-up reads
    /// go there, to the node that took the subscription.
    pub async fn link(&mut self, addr: &Addr) -> RedisResult<Conn> {
        if let Some(link) = self.links.get(addr) {
            return Ok(Conn::Single(link.clone()));
        }
        let link = Self::connect(self.info(addr)?, None).await?;
        self.links.insert(addr.clone(), link.clone());
        Ok(Conn::Single(link))
    }

    /// Whether to log a failure as a warning: not more often than every
    /// [`WARN_EVERY`] while failures go on.
    fn warn_due(&mut self) -> bool {
        let now = Instant::now();
        let due = self.warned.is_none_or(|at| now - at >= WARN_EVERY);
        if due {
            self.warned = Some(now);
        }
        due
    }

    /// True while some subscription is known to be missing: check again soon.
    pub fn unsettled(&self, watched: &HashSet<String>) -> bool {
        self.dirty || self.placed.len() < watched.len()
    }

    /// Reads the slot map from every node, and drops the subscription
    /// connections whose node counts other shard channels than were
    /// subscribed there (their channels are then misplaced). False when
    /// no node answered (the slot map is kept).
    pub async fn check(&mut self) -> bool {
        self.dirty = false;
        self.unreachable.clear();
        let mut known: HashSet<Addr> = self.seeds.iter().cloned().collect();
        known.extend(self.map.nodes.iter().cloned());
        let mut reads = tokio::task::JoinSet::new();
        for addr in known {
            let link = self.links.get(&addr).cloned();
            let info = self.info(&addr);
            reads.spawn(async move {
                let read = async {
                    let mut link = match link {
                        Some(link) => link,
                        None => Self::connect(info?, None).await?,
                    };
                    let text: String = redis::cmd("CLUSTER")
                        .arg("NODES")
                        .query_async(&mut link)
                        .await?;
                    RedisResult::Ok((link, text))
                };
                (addr, read.await)
            });
        }
        let mut map = SlotMap::default();
        while let Some(done) = reads.join_next().await {
            let Ok((addr, read)) = done else { continue };
            match read {
                Ok((link, text)) => {
                    map.add_view(&addr, &text);
                    self.links.insert(addr, link);
                }
                Err(e) => {
                    tracing::debug!(node = %addr, error = %e, "cannot read a cluster node's view");
                    self.links.remove(&addr);
                }
            }
        }
        let read = !map.is_empty();
        if read {
            self.map = map;
        } else if self.warn_due() {
            tracing::warn!("no redis cluster node answered CLUSTER NODES; keeping the slot map");
        }
        self.count().await;
        read
    }

    /// Compares each subscription connection's shard channels, as its
    /// node counts them, with those subscribed there; drops it when they
    /// differ (a subscription was lost, or one is left over). One left
    /// without subscriptions (they all moved elsewhere) is closed.
    async fn count(&mut self) {
        self.subs.retain(|_, sub| !sub.names.is_empty());
        let subs: Vec<(Addr, i64, usize)> = self
            .subs
            .iter()
            .map(|(addr, sub)| (addr.clone(), sub.id, sub.names.len()))
            .collect();
        for (addr, id, expected) in subs {
            // A node that cannot tell (unreachable: the subscription
            // connection's own loss is a push; older than Redis 7.0.3,
            // without the field) is not counted.
            let Some(mut link) = self.links.get(&addr).cloned() else {
                continue;
            };
            let list = redis::cmd("CLIENT")
                .arg("LIST")
                .arg("ID")
                .arg(id)
                .query_async::<String>(&mut link)
                .await;
            let counted = match list {
                // The node knows no such connection any more.
                Ok(list) if list.trim().is_empty() => 0,
                Ok(list) => {
                    let ssub = list
                        .split_whitespace()
                        .find_map(|f| f.strip_prefix("ssub="))
                        .and_then(|n| n.parse::<usize>().ok());
                    match ssub {
                        Some(n) => n,
                        None => continue,
                    }
                }
                Err(e) => {
                    tracing::debug!(node = %addr, error = %e, "cannot count a node's shard subscriptions");
                    continue;
                }
            };
            if counted != expected {
                tracing::warn!(node = %addr, expected, counted, "a redis cluster node does not hold the shard subscriptions made there; subscribing them again");
                self.lost(&addr);
            }
        }
    }

    /// The watched channels whose subscription is missing or is not on
    /// their slot's master now.
    pub fn misplaced<'a>(&self, watched: &'a HashSet<String>) -> Vec<&'a String> {
        watched
            .iter()
            .filter(|channel| match self.placed.get(*channel) {
                None => true,
                Some(p) => self.map.owner(slot(p.name.as_bytes())) != Some(&p.addr),
            })
            .collect()
    }

    /// Subscribes `channel` (announcement name `name`) on its slot's
    /// master, leaving the node it was subscribed on before; returns that
    /// master's address.
    pub async fn subscribe(&mut self, channel: &str, name: String) -> RedisResult<Addr> {
        if self.map.is_empty() {
            self.check().await;
        }
        let addr = self
            .map
            .owner(slot(name.as_bytes()))
            .cloned()
            .ok_or_else(|| failed("no cluster master serves the slot", name.clone()))?;
        match self.placed.get(channel) {
            Some(p) if p.addr == addr => return Ok(addr),
            Some(p) => {
                tracing::info!(%channel, from = %p.addr, to = %addr, "moving a shard subscription to its slot's master");
                self.unsubscribe(channel).await;
            }
            None => {}
        }
        if self.unreachable.contains(&addr) {
            return Err(failed("cluster node unreachable", addr.to_string()));
        }
        if !self.subs.contains_key(&addr) {
            self.serial += 1;
            let serial = self.serial;
            let pushes = self.queue.tagged(Origin {
                node: addr.clone(),
                serial,
            });
            let made = async {
                let mut conn = Self::connect(self.info(&addr)?, Some(pushes)).await?;
                let id: i64 = redis::cmd("CLIENT")
                    .arg("ID")
                    .query_async(&mut conn)
                    .await?;
                RedisResult::Ok((conn, id))
            };
            let (conn, id) = made.await.inspect_err(|_| {
                self.unreachable.insert(addr.clone());
            })?;
            let names = HashSet::new();
            let sub = Sub {
                conn,
                serial,
                id,
                names,
            };
            self.subs.insert(addr.clone(), sub);
        }
        let Some(sub) = self.subs.get_mut(&addr) else {
            return Err(failed("no subscription connection", addr.to_string()));
        };
        let done = redis::cmd("SSUBSCRIBE")
            .arg(&name)
            .exec_async(&mut sub.conn)
            .await;
        if let Err(e) = done {
            if e.code().is_none() {
                // Not an answer of the node (such as MOVED) but a broken
                // or stalled connection: its other subscriptions go with it.
                self.lost(&addr);
                self.unreachable.insert(addr);
            }
            return Err(e);
        }
        if let Some(sub) = self.subs.get_mut(&addr) {
            sub.names.insert(name.clone());
        }
        self.placed.insert(
            channel.to_string(),
            Placed {
                name,
                addr: addr.clone(),
            },
        );
        Ok(addr)
    }

    /// Unsubscribes `channel` where it is subscribed.
    pub async fn unsubscribe(&mut self, channel: &str) {
        let Some(p) = self.placed.remove(channel) else {
            return;
        };
        let Some(sub) = self.subs.get_mut(&p.addr) else {
            return;
        };
        sub.names.remove(&p.name);
        let done = redis::cmd("SUNSUBSCRIBE")
            .arg(&p.name)
            .exec_async(&mut sub.conn)
            .await;
        if let Err(e) = done {
            tracing::debug!(node = %p.addr, error = %e, "SUNSUBSCRIBE failed; dropping the node's subscription connection");
            self.lost(&p.addr);
        }
    }

    /// The subscription connection to `addr` is gone: its channels are
    /// misplaced until subscribed again.
    pub fn lost(&mut self, addr: &str) {
        self.dirty = true;
        self.links.remove(addr);
        if let Some(sub) = self.subs.remove(addr) {
            self.placed.retain(|_, p| !sub.names.contains(&p.name));
        }
    }

    /// The subscription connection `from` closed (unless it was replaced
    /// already); true when it was the current one.
    pub fn closed(&mut self, from: &Origin) -> bool {
        let current = self
            .subs
            .get(&from.node)
            .is_some_and(|sub| sub.serial == from.serial);
        if current {
            self.lost(&from.node);
        }
        current
    }

    /// A `SUNSUBSCRIBE` push of the subscription connection `from` for
    /// `name`: when that is where the channel is subscribed (not the answer
    /// to one of ours, which forgets it first), the node dropped it; true
    /// then.
    pub fn dropped(&mut self, from: &Origin, name: &str) -> bool {
        let Some(sub) = self.subs.get_mut(&from.node) else {
            return false;
        };
        if sub.serial != from.serial {
            return false;
        }
        if !sub.names.remove(name) {
            return false;
        }
        self.placed.retain(|_, p| p.name != name);
        self.dirty = true;
        true
    }
}

/// The broker's side: subscribing where [`Shards`] says, with a catch-up.
impl RedisBroker {
    /// Checks the shard subscriptions of a cluster (`cluster.rs`) and
    /// subscribes every watched channel that has none on its slot's master
    /// there, catching it up.
    pub(super) async fn settle(&self, shards: &mut Shards, watched: &HashSet<String>) {
        let read = shards.check().await;
        let misplaced: Vec<String> = shards.misplaced(watched).into_iter().cloned().collect();
        let mut failed = 0;
        for channel in misplaced {
            if let Err(e) = self.place(shards, &channel).await {
                tracing::debug!(%channel, error = %e, "cannot subscribe a channel where its cluster slot is");
                failed += 1;
                if shards.warn_due() {
                    tracing::warn!(%channel, error = %e, "cannot subscribe a channel where its cluster slot is (nor perhaps others); trying again every 200 ms");
                }
            }
        }
        if read && failed == 0 {
            shards.warned = None;
        }
    }

    /// Subscribes `channel` on its slot's master, then delivers what it
    /// missed: its history read on that node, after the subscription, so
    /// that every message stored there is either read or announced. A
    /// failed read leaves it unsubscribed, to be tried again.
    async fn place(&self, shards: &mut Shards, channel: &str) -> redis::RedisResult<()> {
        let node = shards
            .subscribe(channel, self.layout.announce(channel))
            .await?;
        let Some(sink) = self.sink.get() else {
            return Ok(());
        };
        let read = async {
            let mut link = shards.link(&node).await?;
            self.read_noting_losses(&mut link, channel, true, true)
                .await
        };
        match read.await {
            Ok(history) => {
                tracing::info!(%channel, %node, "subscribed on the slot's master; caught up");
                sink.resync(channel, history).await;
                Ok(())
            }
            Err(e) => {
                shards.unsubscribe(channel).await;
                Err(e)
            }
        }
    }

    /// A push of a cluster node's subscription connection other than an
    /// announcement; true when a shard subscription was lost with it (the
    /// connection closed, or the node dropped a watched channel's
    /// subscription with `SUNSUBSCRIBE`): check them at once.
    pub(super) fn node_push(&self, shards: &mut Shards, from: &Origin, info: PushInfo) -> bool {
        let node = &from.node;
        match info.kind {
            PushKind::Disconnection => {
                let current = shards.closed(from);
                if current {
                    tracing::warn!(%node, "lost a redis cluster node's subscription connection; subscribing its channels again");
                }
                current
            }
            PushKind::SUnsubscribe => {
                let Some(redis::Value::BulkString(name)) = info.data.first() else {
                    return false;
                };
                let Ok(name) = std::str::from_utf8(name) else {
                    return false;
                };
                let dropped = shards.dropped(from, name);
                if dropped {
                    tracing::warn!(%node, %name, "redis dropped a watched channel's shard subscription (its slot moved); subscribing it where the slot is now");
                }
                dropped
            }
            _ => false,
        }
    }
}
