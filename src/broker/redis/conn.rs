//! Connecting to Redis: a single server (`redis://`, `rediss://`), a
//! cluster (`redis+cluster://h1:p1,h2:p2`) or the master named by Sentinel
//! (`redis+sentinel://s1:p1,s2:p2/name`, see `sentinel.rs`), always RESP3
//! so that one multiplexed connection carries commands and pub/sub pushes.

use super::sentinel::{self, SentinelTarget};
use crate::broker::UrlError;
use crate::secret::redact_url;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{
    Cmd, IntoConnectionInfo, Pipeline, ProtocolVersion, PushInfo, RedisFuture, RedisResult, Value,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a command may take, unless `WAIT`'s timeout needs longer.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the broker connects: one server, a cluster, or the master named
/// by Sentinel.
pub enum Topology {
    Single(redis::ConnectionInfo),
    Cluster(Vec<redis::ConnectionInfo>),
    /// The master the sentinels name, asked again on every connection.
    Sentinel(SentinelTarget),
}

impl Topology {
    /// Parses a broker URL (and, for Sentinel, the sentinels' own
    /// password); the error names what is wrong, without secrets.
    pub fn parse(url: &str, sentinel_password: &str) -> Result<Topology, UrlError> {
        for (scheme, tls) in [("redis+sentinel://", false), ("rediss+sentinel://", true)] {
            if let Some(rest) = url.strip_prefix(scheme) {
                return SentinelTarget::parse(rest, tls, sentinel_password).map(Topology::Sentinel);
            }
        }
        let resp3 = |mut info: redis::ConnectionInfo| {
            info.redis.protocol = ProtocolVersion::RESP3;
            info
        };
        if let Some(rest) = url.strip_prefix("redis+cluster://") {
            let (auth, hosts) = match rest.rsplit_once('@') {
                Some((a, h)) => (format!("{a}@"), h),
                None => (String::new(), rest),
            };
            let hosts = hosts.trim_end_matches('/');
            let mut nodes = Vec::new();
            for host in hosts.split(',').filter(|h| !h.is_empty()) {
                let node = format!("redis://{auth}{host}");
                let info = node
                    .as_str()
                    .into_connection_info()
                    .map_err(|e| UrlError(format!("cluster node '{host}': {e}")))?;
                nodes.push(resp3(info));
            }
            if nodes.is_empty() {
                let why = "redis+cluster:// needs at least one host:port";
                return Err(UrlError(why.into()));
            }
            return Ok(Topology::Cluster(nodes));
        }
        let info = url
            .into_connection_info()
            .map_err(|e| UrlError(format!("'{}': {e}", redact_url(url))))?;
        Ok(Topology::Single(resp3(info)))
    }

    /// Opens a connection whose pub/sub pushes go to `pushes`, whose
    /// commands may take `response_timeout`.
    pub async fn connect(
        &self,
        pushes: PushQueue,
        response_timeout: Duration,
    ) -> RedisResult<Conn> {
        match self {
            Topology::Single(info) => {
                let client = redis::Client::open(info.clone())?;
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(CONNECT_TIMEOUT)
                    .set_response_timeout(response_timeout)
                    .set_push_sender(pushes);
                let conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                Ok(Conn::Single(conn))
            }
            Topology::Cluster(nodes) => {
                let client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                    .use_protocol(ProtocolVersion::RESP3)
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(response_timeout)
                    .retries(2)
                    .push_sender(pushes)
                    .build()?;
                let mut conn = client.get_async_connection().await?;
                // Sharded pub/sub (Redis >= 7) keeps announcements on the
                // channel's own shard; older clusters broadcast.
                let info: Value = redis::cmd("COMMAND")
                    .arg("INFO")
                    .arg("SPUBLISH")
                    .query_async(&mut conn)
                    .await?;
                let sharded = matches!(&info, Value::Array(items) if items.iter().any(|v| !matches!(v, Value::Nil)));
                Ok(Conn::Cluster { conn, sharded })
            }
            Topology::Sentinel(target) => {
                let client = target.master().await?;
                let addr = sentinel::address(&client.get_connection_info().addr);
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(CONNECT_TIMEOUT)
                    .set_response_timeout(response_timeout)
                    .set_push_sender(pushes);
                let mut conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                // The sentinels may lag behind a failover: never write to
                // a server that is a replica now.
                if !sentinel::is_master(&mut conn).await? {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::ReadOnly,
                        "the server the sentinels name is not a master (yet)",
                        addr,
                    )));
                }
                match target.confirmed(&addr) {
                    Some(before) => {
                        crate::metrics::BROKER_FAILOVERS.inc();
                        tracing::warn!(master = %addr, before = %before, name = target.master_name(), "the redis master changed: a failover was followed");
                    }
                    None => {
                        tracing::info!(master = %addr, name = target.master_name(), "the sentinels name the redis master")
                    }
                }
                Ok(Conn::Single(conn))
            }
        }
    }

    /// The nodes of a cluster target.
    pub fn cluster_nodes(&self) -> Option<&[redis::ConnectionInfo]> {
        match self {
            Topology::Cluster(nodes) => Some(nodes),
            _ => None,
        }
    }

    /// The Sentinel target, when the broker follows one.
    pub fn sentinel(&self) -> Option<&SentinelTarget> {
        match self {
            Topology::Sentinel(t) => Some(t),
            _ => None,
        }
    }
}

/// A pub/sub push, with the cluster node subscription connection
/// (`cluster.rs`) that sent it; None when it came from the broker's main
/// connection.
pub struct Push {
    pub info: PushInfo,
    pub from: Option<Arc<Origin>>,
}

/// A subscription connection to a cluster node: the node's address and
/// the connection's serial number, so that a late push of a closed
/// connection is not taken for one of its successor.
#[derive(Debug, PartialEq, Eq)]
pub struct Origin {
    pub node: Arc<str>,
    pub serial: u64,
}

/// Where a connection's pub/sub pushes wait for the broker task: bounded.
/// When it is full, the push is dropped and the queue marked overflowed;
/// the broker then treats the connection as lost, reconnects and catches
/// up from the stored history, so nothing is lost and memory stays bounded.
#[derive(Clone)]
pub struct PushQueue {
    tx: tokio::sync::mpsc::Sender<Push>,
    overflowed: Arc<AtomicBool>,
    from: Option<Arc<Origin>>,
}

impl PushQueue {
    /// A queue of `capacity` pushes and its receiving end.
    pub fn new(capacity: usize) -> (PushQueue, tokio::sync::mpsc::Receiver<Push>) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        let queue = PushQueue {
            tx,
            overflowed: Default::default(),
            from: None,
        };
        (queue, rx)
    }

    /// The same queue, for the pushes of a cluster node's subscription
    /// connection.
    pub fn tagged(&self, origin: Origin) -> PushQueue {
        PushQueue {
            from: Some(Arc::new(origin)),
            ..self.clone()
        }
    }

    /// True once a push was dropped because the queue was full.
    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }
}

impl redis::aio::AsyncPushSender for PushQueue {
    fn send(&self, info: PushInfo) -> Result<(), redis::aio::SendError> {
        use tokio::sync::mpsc::error::TrySendError;
        let push = Push {
            info,
            from: self.from.clone(),
        };
        match self.tx.try_send(push) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.overflowed.store(true, Ordering::Release);
                Ok(())
            }
            Err(TrySendError::Closed(_)) => Err(redis::aio::SendError),
        }
    }
}

/// One connection, single-server or cluster.
#[derive(Clone)]
pub enum Conn {
    Single(MultiplexedConnection),
    Cluster {
        conn: ClusterConnection,
        sharded: bool,
    },
}

impl Conn {
    /// True when announcements use SPUBLISH/SSUBSCRIBE.
    pub fn sharded(&self) -> bool {
        matches!(self, Conn::Cluster { sharded: true, .. })
    }

    /// Subscribes to announcement names (`SUBSCRIBE`; on a cluster with
    /// sharded pub/sub, `cluster.rs` holds the subscriptions instead).
    pub async fn subscribe(&mut self, names: &[String]) -> RedisResult<()> {
        if names.is_empty() {
            return Ok(());
        }
        match self {
            Conn::Single(c) => c.subscribe(names).await,
            Conn::Cluster { conn, .. } => conn.subscribe(names).await,
        }
    }

    /// Waits until `replicas` replicas have every write made so far on the
    /// connection to the node that holds `key` (`WAIT`, at most
    /// `timeout_ms`); returns how many have. On a cluster, `WAIT` goes to
    /// the master of `key`'s slot, over the very connection that carried
    /// the write (redis-rs would otherwise send it to every master).
    pub async fn wait_replicas(
        &mut self,
        key: &str,
        replicas: usize,
        timeout_ms: u64,
    ) -> RedisResult<i64> {
        let mut wait = redis::cmd("WAIT");
        wait.arg(replicas).arg(timeout_ms);
        match self {
            Conn::Single(c) => wait.query_async(c).await,
            Conn::Cluster { conn, .. } => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let route = Route::new(slot(key.as_bytes()), SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                let value = conn.route_command(&wait, routing).await?;
                redis::from_redis_value(&value)
            }
        }
    }

    /// Unsubscribes from announcement names.
    pub async fn unsubscribe(&mut self, names: &[String]) -> RedisResult<()> {
        match self {
            Conn::Single(c) => c.unsubscribe(names).await,
            Conn::Cluster { conn, .. } => conn.unsubscribe(names).await,
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster { conn, .. } => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster { conn, .. } => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster { conn, .. } => conn.get_db(),
        }
    }
}

/// The Cluster slot of `key`: CRC16 (XMODEM) of its hash tag (the part
/// between the first `{` and the next `}`, when not empty) or of the whole
/// key, modulo 16384.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|b| *b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|b| *b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    let mut crc: u16 = 0;
    for byte in tagged.unwrap_or(key) {
        crc ^= (*byte as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[cfg(test)]
mod tests {
    /// The slots Redis itself gives (`CLUSTER KEYSLOT`).
    #[test]
    fn slots_are_those_of_redis() {
        assert_eq!(super::slot(b"foo"), 12182);
        assert_eq!(super::slot(b"pollgate:{foo}:h"), 12182);
        assert_eq!(super::slot(b"123456789"), 12739);
        assert_eq!(super::slot(b"a{}b"), super::slot(b"a{}b"));
    }
}
