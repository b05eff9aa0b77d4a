//! The Redis broker behind `redis://`, `rediss://`, `redis+cluster://` and
//! `redis+sentinel://`: any number of pollgate instances share one set of
//! channels.
//!
//! Each channel's history is a Redis Stream (the stream id is the message
//! id), trimmed to `history` entries and expiring `history_ttl` after the
//! last publish. A publish is one Lua script that appends to the stream and
//! announces the message, payload included, on the channel's pub/sub name.
//! Each instance holds one multiplexed RESP3 connection that carries both
//! commands and the subscriptions of the channels it has waiters on, and
//! hands every announcement to the hub. When the connection drops, the
//! broker reports itself down, reconnects with backoff, resubscribes and
//! catches every watched channel up from its stream. Behind Sentinel, a
//! `+switch-master` announcement or a `READONLY` answer makes it reconnect
//! to the master the sentinels name now. On a cluster with sharded pub/sub
//! the subscriptions are on the broker's own connections to the masters
//! (`cluster.rs`), checked about once a second and moved, with a catch-up,
//! when a slot's master changes. The key layout and payload are documented
//! in `docs/redis.md`.

mod catch_up;
mod cluster;
mod conn;
mod layout;
mod occupancy;
mod presence;
mod sentinel;
mod slots;

use super::{Broker, BrokerError, PresenceChange, PresenceSweep, Sink, UrlError};
use crate::history::History;
use crate::message::Message;
use crate::metrics;
use async_trait::async_trait;
use bytes::Bytes;
use cluster::Shards;
use conn::{Conn, Push, PushQueue, Topology};
use layout::Layout;
use parking_lot::{Mutex, RwLock};
use redis::{PushInfo, PushKind};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};

pub use layout::{PUBLISH_SCRIPT, READ_SCRIPT};

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Announcements waiting for the broker task, per connection.
const PUSH_QUEUE: usize = 8192;
/// An overflow this soon after the previous one reconnects after the
/// backoff, not at once: no reconnection loop under a lasting overload.
const OVERFLOW_AGAIN: Duration = Duration::from_secs(1);
/// Longest wait for room among `broker.max_pending` commands.
const PENDING_WAIT: Duration = Duration::from_secs(2);
/// How often the shard subscriptions of a cluster are checked (`cluster.rs`).
const SHARDS_CHECK: Duration = Duration::from_secs(1);
/// How often while one of them is known to be missing.
const SHARDS_RETRY: Duration = Duration::from_millis(200);

/// Requests from the hub to the connection task.
enum Control {
    Watch(String, oneshot::Sender<Result<(), BrokerError>>),
    Unwatch(String),
}

/// Why the connection task left its serving loop.
enum Left {
    Lost,
    /// Announcements came faster than they were handled: reconnect at
    /// once (Redis is fine; but after the backoff when the previous
    /// overflow was less than [`OVERFLOW_AGAIN`] ago) and catch up.
    Overflowed,
    /// The sentinels named a new master, or the server answered READONLY:
    /// reconnect at once to the master named now.
    Switched,
    Shutdown,
}

/// The Redis broker.
pub struct RedisBroker {
    topology: Topology,
    layout: Layout,
    conn: RwLock<Option<Conn>>,
    up: AtomicBool,
    /// The same, for [`Broker::until_up`].
    up_changed: watch::Sender<bool>,
    /// Connected at least once since start (readiness, see `Broker::reached`).
    reached: AtomicBool,
    sink: OnceLock<Arc<dyn Sink>>,
    control: mpsc::UnboundedSender<Control>,
    control_rx: Mutex<Option<mpsc::UnboundedReceiver<Control>>>,
    /// Room for commands in flight (`broker.max_pending`).
    pending: Semaphore,
    /// The dataset's epoch, read on every connection (0 before the first).
    epoch: AtomicU64,
    /// Woken when the master may have changed (Sentinel only): a
    /// `+switch-master` announcement, or a write answered READONLY.
    switched: Arc<Notify>,
    /// Replicas that must have a message before its publish answers
    /// (`publish.replicas`), and how long to wait for them.
    replicas: usize,
    replica_timeout: Duration,
    /// `broker.url` with its password as `***`.
    shown_url: String,
    /// This instance's id among the fleet's (occupancy, `occupancy.rs`).
    instance: String,
    /// This instance has put itself in the fleet's presence (`presence.rs`).
    in_presence: AtomicBool,
}

/// A spawned task, aborted when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// Checks a Redis broker URL without connecting; the error says what is wrong.
pub fn check_url(url: &str) -> Result<(), UrlError> {
    Topology::parse(url, "").map(|_| ())
}

impl RedisBroker {
    /// A broker for `url` (not connected until [`Broker::run`]; the
    /// sentinels' own password is `sentinel_password`), keeping
    /// `history` messages per channel for `history_ttl`, under `namespace`,
    /// with at most `max_pending` commands in flight.
    ///
    /// The control queue (watch/unwatch) is unbounded on purpose: each
    /// entry stands for one active channel of the hub, which
    /// `limits.max_active_channels` bounds.
    pub fn new(
        url: &str,
        sentinel_password: &str,
        namespace: &str,
        history: usize,
        history_ttl: Duration,
        max_pending: usize,
    ) -> Result<RedisBroker, UrlError> {
        let topology = Topology::parse(url, sentinel_password)?;
        let (control, control_rx) = mpsc::unbounded_channel();
        Ok(RedisBroker {
            topology,
            layout: Layout::new(namespace, history, history_ttl),
            conn: RwLock::new(None),
            up: AtomicBool::new(false),
            up_changed: watch::Sender::new(false),
            reached: AtomicBool::new(false),
            sink: OnceLock::new(),
            control,
            control_rx: Mutex::new(Some(control_rx)),
            pending: Semaphore::new(max_pending),
            epoch: AtomicU64::new(0),
            switched: Arc::new(Notify::new()),
            replicas: 0,
            replica_timeout: Duration::from_secs(1),
            shown_url: crate::secret::redact_url(url),
            instance: format!("{:016x}", fastrand::u64(..)),
            in_presence: AtomicBool::new(false),
        })
    }

    /// A failed command as a broker error; behind Sentinel, a READONLY
    /// answer (the server was demoted) also makes the connection task ask
    /// the sentinels for the master again.
    fn failed(&self, e: redis::RedisError) -> BrokerError {
        if e.kind() == redis::ErrorKind::ReadOnly && self.topology.sentinel().is_some() {
            tracing::warn!("redis answered READONLY: asking the sentinels for the master again");
            self.switched.notify_one();
        }
        unavailable(e)
    }

    /// Publishes answer only once `replicas` Redis replicas have the
    /// message (`WAIT`, at most `timeout`); returns the broker.
    pub fn with_replicas(mut self, replicas: usize, timeout: Duration) -> RedisBroker {
        self.replicas = replicas;
        self.replica_timeout = timeout;
        self
    }

    fn connection(&self) -> Result<Conn, BrokerError> {
        self.conn
            .read()
            .clone()
            .ok_or_else(|| unavailable("not connected to redis"))
    }

    /// Waits for room among the commands in flight; Busy after
    /// [`PENDING_WAIT`].
    async fn room(&self) -> Result<tokio::sync::SemaphorePermit<'_>, BrokerError> {
        match tokio::time::timeout(PENDING_WAIT, self.pending.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                metrics::Refusal::BrokerBusy.count();
                Err(BrokerError::Busy(
                    "too many redis commands in flight (broker.max_pending)".into(),
                ))
            }
        }
    }

    fn set_up(&self, conn: Option<Conn>) {
        if conn.is_some() {
            self.reached.store(true, Ordering::Release);
        }
        self.up.store(conn.is_some(), Ordering::Release);
        self.up_changed.send_replace(conn.is_some());
        metrics::BROKER_UP.set(conn.is_some() as i64);
        *self.conn.write() = conn;
    }

    /// Hands an announcement to the sink. Returns false when the sink had
    /// no room for it: the caller drops the connection and catches up.
    fn on_push(&self, push: PushInfo) -> bool {
        let [redis::Value::BulkString(name), redis::Value::BulkString(payload)] =
            push.data.as_slice()
        else {
            return true;
        };
        let Some(channel) = self.layout.channel_of(name) else {
            return true;
        };
        match layout::decode_payload(&channel, payload) {
            Some(m) => match self.sink.get() {
                Some(sink) => sink.deliver(Arc::new(m)),
                None => true,
            },
            None => {
                tracing::warn!(%channel, "ignoring a malformed announcement");
                true
            }
        }
    }

    /// Subscribes every watched channel on a new connection.
    async fn resubscribe(
        &self,
        conn: &mut Conn,
        watched: &HashSet<String>,
    ) -> redis::RedisResult<()> {
        let names: Vec<String> = watched.iter().map(|c| self.layout.announce(c)).collect();
        for chunk in names.chunks(500) {
            conn.subscribe(chunk).await?;
        }
        Ok(())
    }

    /// Connects, resubscribes every watched channel and, on a reconnect,
    /// catches them up. None (logged) when any step fails: the caller backs
    /// off and tries again. On a cluster with sharded pub/sub, the shard
    /// subscriptions come with the connection, empty: the first check
    /// ([`RedisBroker::settle`], at once) subscribes and catches up.
    async fn open(
        &self,
        queue: &PushQueue,
        watched: &HashSet<String>,
        reconnect: bool,
    ) -> Option<(Conn, Option<Shards>)> {
        let response_timeout =
            conn::RESPONSE_TIMEOUT.max(self.replica_timeout + Duration::from_secs(1));
        let mut conn = match self.topology.connect(queue.clone(), response_timeout).await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "cannot connect to redis");
                return None;
            }
        };
        let shards = match self.topology.cluster_nodes() {
            Some(nodes) if conn.sharded() => Shards::new(nodes, queue.clone()),
            _ => None,
        };
        if shards.is_none() {
            if let Err(e) = self.resubscribe(&mut conn, watched).await {
                tracing::warn!(error = %e, "redis resubscribe failed");
                return None;
            }
        }
        // Before anything is served or caught up on this connection: a
        // Redis that lost its data has a new epoch, and the waiters that
        // the catch-up wakes must see it.
        let same_dataset = match self.layout.epoch(&mut conn).await {
            Ok(epoch) => {
                let before = self.epoch.swap(epoch, Ordering::AcqRel);
                if before != 0 && before != epoch {
                    tracing::warn!("redis holds a new dataset (its epoch changed): cursors of the old one get a gap");
                }
                before == epoch
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the redis dataset's epoch");
                return None;
            }
        };
        self.set_up(Some(conn.clone()));
        if !reconnect {
            tracing::info!("connected to redis");
            return Some((conn, shards));
        }
        metrics::BROKER_RECONNECTS.inc();
        tracing::info!(
            channels = watched.len(),
            "reconnected to redis; catching up"
        );
        if shards.is_none()
            && self
                .catch_up(&mut conn, watched, same_dataset)
                .await
                .is_err()
        {
            self.set_up(None);
            return None;
        }
        Some((conn, shards))
    }

    /// Serves one connection until it is lost or shutdown.
    #[allow(clippy::too_many_arguments)]
    async fn serve(
        &self,
        mut conn: Conn,
        mut shards: Option<Shards>,
        queue: &PushQueue,
        pushes: &mut mpsc::Receiver<Push>,
        control: &mut mpsc::UnboundedReceiver<Control>,
        watched: &mut HashSet<String>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Left {
        let mut check = tokio::time::Instant::now();
        loop {
            tokio::select! {
                push = pushes.recv() => match push {
                    _ if queue.overflowed() => {
                        tracing::warn!("announcements arrive faster than they are handled; reconnecting to catch up");
                        return Left::Overflowed;
                    }
                    Some(p) if matches!(p.info.kind, PushKind::Message | PushKind::SMessage) => {
                        if !self.on_push(p.info) {
                            // This push and every later one of this
                            // connection are recovered from the streams.
                            tracing::warn!("the hub's delivery queue is full (broker.delivery_queue); reconnecting to catch up");
                            return Left::Overflowed;
                        }
                    }
                    Some(Push { from: Some(from), info }) => {
                        let Some(shards) = shards.as_mut() else { continue };
                        if self.node_push(shards, &from, info) {
                            check = tokio::time::Instant::now();
                        }
                    }
                    Some(p) if p.info.kind == PushKind::Disconnection => return Left::Lost,
                    Some(_) => {}
                    None => return Left::Lost,
                },
                c = control.recv() => match c {
                    Some(Control::Watch(channel, ack)) => {
                        if let Some(shards) = shards.as_mut() {
                            let name = self.layout.announce(&channel);
                            let result = shards.subscribe(&channel, name).await;
                            watched.insert(channel);
                            let _ = ack.send(result.map(|_| ()).map_err(unavailable));
                            continue;
                        }
                        if watched.contains(&channel) {
                            let _ = ack.send(Ok(()));
                            continue;
                        }
                        let result = conn.subscribe(&[self.layout.announce(&channel)]).await;
                        watched.insert(channel);
                        let failed = result.is_err();
                        let _ = ack.send(result.map_err(unavailable));
                        if failed {
                            return Left::Lost;
                        }
                    }
                    Some(Control::Unwatch(channel)) => {
                        if watched.remove(&channel) {
                            match shards.as_mut() {
                                Some(shards) => shards.unsubscribe(&channel).await,
                                None => {
                                    let _ = conn.unsubscribe(&[self.layout.announce(&channel)]).await;
                                }
                            }
                        }
                    }
                    None => return Left::Shutdown,
                },
                _ = tokio::time::sleep_until(check), if shards.is_some() => {
                    if let Some(shards) = shards.as_mut() {
                        self.settle(shards, watched).await;
                        let wait = if shards.unsettled(watched) { SHARDS_RETRY } else { SHARDS_CHECK };
                        check = tokio::time::Instant::now() + wait;
                    }
                }
                _ = self.switched.notified(), if self.topology.sentinel().is_some() => {
                    return Left::Switched;
                }
                _ = shutdown.changed() => return Left::Shutdown,
            }
        }
    }

    /// Waits out a backoff while recording (and refusing) watch requests;
    /// cut short when the sentinels name a new master. Returns false on
    /// shutdown.
    async fn wait_offline(
        &self,
        backoff: Duration,
        control: &mut mpsc::UnboundedReceiver<Control>,
        watched: &mut HashSet<String>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let until = tokio::time::Instant::now() + backoff;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return true,
                _ = self.switched.notified(), if self.topology.sentinel().is_some() => return true,
                c = control.recv() => match c {
                    Some(Control::Watch(channel, ack)) => {
                        watched.insert(channel);
                        let _ = ack.send(Err(unavailable("not connected to redis")));
                    }
                    Some(Control::Unwatch(channel)) => {
                        watched.remove(&channel);
                    }
                    None => return false,
                },
                _ = shutdown.changed() => return false,
            }
        }
    }
}

#[async_trait]
impl Broker for RedisBroker {
    fn epoch(&self) -> crate::cursor::Epoch {
        self.epoch.load(Ordering::Acquire)
    }

    async fn publish(
        &self,
        channel: &str,
        content_type: String,
        data: Bytes,
    ) -> Result<Arc<Message>, BrokerError> {
        let _room = self.room().await?;
        let mut conn = self.connection()?;
        let id = self
            .layout
            .publish(&mut conn, channel, &content_type, &data)
            .await
            .map_err(|e| self.failed(e))?;
        if self.replicas > 0 {
            let ms = self.replica_timeout.as_millis().max(1) as u64;
            let key = self.layout.announce(channel);
            let acked = conn
                .wait_replicas(&key, self.replicas, ms)
                .await
                .map_err(|e| self.failed(e))?;
            if acked < self.replicas as i64 {
                return Err(BrokerError::NotReplicated(format!(
                    "message {id} reached {acked} of the {} redis replicas asked for \
                     (publish.replicas) within {} ms; it may still exist",
                    self.replicas, ms
                )));
            }
        }
        Ok(Arc::new(Message::new(
            id,
            channel.into(),
            content_type,
            data,
        )))
    }

    async fn report_occupancy(&self, counts: &[(Arc<str>, usize)]) -> Result<(), BrokerError> {
        self.report(counts).await
    }

    async fn others_occupancy(&self, channel: &str) -> Result<usize, BrokerError> {
        self.others(channel).await
    }

    async fn apply_presence(
        &self,
        changes: &[PresenceChange],
    ) -> Result<Vec<Option<u64>>, BrokerError> {
        self.apply(changes).await
    }

    async fn presence_turn(&self, channel: &str, place: u64) -> Result<bool, BrokerError> {
        self.turn(channel, place).await
    }

    async fn presence_sent(&self, channel: &str, place: u64) -> Result<(), BrokerError> {
        self.sent(channel, place, true).await
    }

    async fn presence_dropped(&self, channel: &str, place: u64) -> Result<(), BrokerError> {
        self.sent(channel, place, false).await
    }

    async fn presence(&self, channel: &str) -> Result<Option<Vec<(String, u64)>>, BrokerError> {
        self.present(channel).await.map(Some)
    }

    async fn sweep_presence(&self) -> Result<PresenceSweep, BrokerError> {
        self.sweep().await
    }

    async fn history(&self, channel: &str) -> Result<History, BrokerError> {
        let _room = self.room().await?;
        let mut conn = self.connection()?;
        self.layout
            .read(&mut conn, channel)
            .await
            .map_err(unavailable)
    }

    fn set_sink(&self, sink: Arc<dyn Sink>) {
        let _ = self.sink.set(sink);
    }

    async fn watch(&self, channel: &str) -> Result<(), BrokerError> {
        let (ack, done) = oneshot::channel();
        self.control
            .send(Control::Watch(channel.to_string(), ack))
            .map_err(|_| unavailable("broker stopped"))?;
        done.await.map_err(|_| unavailable("broker stopped"))?
    }

    fn unwatch(&self, channel: &str) {
        let _ = self.control.send(Control::Unwatch(channel.to_string()));
    }

    fn instance(&self) -> &str {
        &self.instance
    }

    fn address(&self) -> String {
        match self.topology.sentinel().and_then(|t| t.current()) {
            Some(master) => format!("{} (master {master})", self.shown_url),
            None => self.shown_url.clone(),
        }
    }

    fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    async fn until_up(&self) {
        let _ = self.up_changed.subscribe().wait_for(|up| *up).await;
    }

    fn reached(&self) -> bool {
        self.reached.load(Ordering::Acquire)
    }

    async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        let Some(mut control) = self.control_rx.lock().take() else {
            return;
        };
        // Behind Sentinel, its announcements of a new master are watched
        // for as long as the broker runs.
        let _watch = self
            .topology
            .sentinel()
            .map(|t| AbortOnDrop(tokio::spawn(t.clone().watch(self.switched.clone()))));
        let mut watched = HashSet::new();
        let mut backoff = MIN_BACKOFF;
        let mut connected_before = false;
        let mut overflowed: Option<tokio::time::Instant> = None;
        loop {
            let (queue, mut pushes) = PushQueue::new(PUSH_QUEUE);
            if let Some((conn, shards)) = self.open(&queue, &watched, connected_before).await {
                connected_before = true;
                backoff = MIN_BACKOFF;
                let left = self
                    .serve(
                        conn,
                        shards,
                        &queue,
                        &mut pushes,
                        &mut control,
                        &mut watched,
                        &mut shutdown,
                    )
                    .await;
                self.set_up(None);
                match left {
                    Left::Shutdown => return,
                    Left::Overflowed => {
                        let now = tokio::time::Instant::now();
                        let again = overflowed.is_some_and(|t| now - t < OVERFLOW_AGAIN);
                        overflowed = Some(now);
                        if !again {
                            continue;
                        }
                    }
                    Left::Switched => {
                        tracing::warn!(
                            "the redis master changed; reconnecting to the one the sentinels name"
                        );
                        continue;
                    }
                    Left::Lost => tracing::warn!("lost the redis connection; reconnecting"),
                }
            }
            if !self
                .wait_offline(backoff, &mut control, &mut watched, &mut shutdown)
                .await
            {
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}
