//! Presence webhooks (docs/presence.md, "Webhooks"): the fleet's presence
//! changes POSTed as JSON to `webhooks.upstream` at `webhooks.path`,
//! signed (`Pollgate-Signature: sha256=<hex HMAC-SHA256 of the body>`),
//! at least once: each event is retried with backoff until a 2xx, under
//! the same `id`.
//!
//! Events wait in [`LANES`] bounded queues; a channel's events always take
//! the same lane, and a lane sends one event at a time, each once its turn
//! in the channel's fleet-wide order has come ([`Broker::presence_turn`]),
//! so that a channel's events arrive in order whichever instances decided
//! them. What a full lane cannot take is dropped and counted
//! (`pollgate_webhook_events_dropped_total`), and passed over in the order.
//! A queued event counts as in flight ([`Lifecycle::enter`]): a draining
//! instance sends what it queued, within `grace_period`, before it exits.

use crate::broker::{Broker, PresenceChange};
use crate::config::{WebhookEvent, WebhooksConfig};
use crate::lifecycle::{InFlight, Lifecycle};
use crate::metrics;
use crate::upstream::Upstreams;
use ahash::RandomState;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use pingora::http::RequestHeader;
use sha2::Sha256;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Queues of events, each sending in order.
pub const LANES: usize = 4;
/// Events waiting per instance, at most.
pub const QUEUE: usize = 10_000;
/// First wait before a retry; doubled each time up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Largest answer read from the receiver.
const MAX_ANSWER: u64 = 64 * 1024;
/// How often an event waiting for its turn asks again.
const TURN_POLL: Duration = Duration::from_millis(50);

/// One event, as sent.
#[derive(Debug, Clone)]
pub struct Event {
    /// Idempotency key: the same on every retry.
    pub id: String,
    pub event: WebhookEvent,
    pub channel: Arc<str>,
    pub subscriber: Option<Arc<str>>,
    /// When the change was decided (Unix ms).
    pub at: u64,
    /// Its place in the channel's fleet-wide order.
    pub place: u64,
    /// Holds a drain until the event is sent (or dropped).
    _in_flight: InFlight,
}

impl Event {
    /// The JSON body.
    pub fn body(&self) -> Bytes {
        let mut body = serde_json::json!({
            "id": self.id,
            "event": self.event.name(),
            "channel": &*self.channel,
            "at": self.at,
        });
        if let Some(s) = &self.subscriber {
            body["subscriber"] = serde_json::Value::from(&**s);
        }
        Bytes::from(body.to_string())
    }
}

/// The event a change of the fleet's presence is.
pub fn event_of(change: &PresenceChange) -> WebhookEvent {
    match (&change.subscriber, change.present) {
        (None, true) => WebhookEvent::ChannelOccupied,
        (None, false) => WebhookEvent::ChannelVacated,
        (Some(_), true) => WebhookEvent::SubscriberJoined,
        (Some(_), false) => WebhookEvent::SubscriberLeft,
    }
}

/// `sha256=<hex>` of the HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Runs `step` until it succeeds, waiting a little longer each time.
async fn retry<F, Fut>(mut step: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), crate::broker::BrokerError>>,
{
    let mut backoff = FIRST_BACKOFF;
    while step().await.is_err() {
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Where events go, and the lanes they wait in.
pub struct Webhooks {
    broker: Arc<dyn Broker>,
    life: Arc<Lifecycle>,
    upstreams: Arc<Upstreams>,
    upstream: String,
    path: String,
    events: Vec<WebhookEvent>,
    secret: Vec<u8>,
    lanes: Vec<mpsc::Sender<Event>>,
    pick: RandomState,
    /// Event ids: `<instance>-<sequence>`.
    instance: String,
    sequence: AtomicU64,
}

/// A lane's queue, sent by [`Webhooks::run_lane`].
pub type Lane = mpsc::Receiver<Event>;

impl Webhooks {
    /// The webhooks of `config` (None without `upstream`), sending through
    /// `upstreams` in the order kept by `broker`, with event ids of the
    /// broker's instance, each event in flight in `life` until sent; and
    /// their lanes, each to be run by [`Webhooks::run_lane`].
    pub fn new(
        config: &WebhooksConfig,
        upstreams: Arc<Upstreams>,
        broker: Arc<dyn Broker>,
        life: Arc<Lifecycle>,
    ) -> Option<(Arc<Webhooks>, Vec<Lane>)> {
        let upstream = config.upstream.clone()?;
        let (lanes, queues): (Vec<_>, Vec<_>) =
            (0..LANES).map(|_| mpsc::channel(QUEUE / LANES)).unzip();
        let instance = broker.instance().to_string();
        let hooks = Webhooks {
            broker,
            life,
            upstreams,
            upstream,
            path: config.path.clone(),
            events: config.events.clone(),
            secret: config.secret.as_bytes().to_vec(),
            lanes,
            pick: RandomState::new(),
            instance,
            sequence: AtomicU64::new(0),
        };
        Some((Arc::new(hooks), queues))
    }

    /// Whether `change`'s event is one of `webhooks.events`.
    pub fn wants(&self, change: &PresenceChange) -> bool {
        self.events.contains(&event_of(change))
    }

    /// Queues the event of `change`, at `place` of its channel's order
    /// (it must be [`Webhooks::wants`]); drops it, counted, when its lane
    /// is full.
    pub fn send(&self, change: &PresenceChange, place: u64) {
        let event = event_of(change);
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let event = Event {
            id: format!("{}-{sequence}", self.instance),
            event,
            channel: change.channel.clone(),
            subscriber: change.subscriber.clone(),
            at: change.at,
            place,
            _in_flight: self.life.enter(),
        };
        let lane = self.pick.hash_one(&*event.channel) as usize % LANES;
        match self.lanes[lane].try_send(event) {
            Ok(()) => metrics::WEBHOOK_QUEUE.inc(),
            Err(e) => {
                metrics::WEBHOOKS_DROPPED.inc();
                let event = e.into_inner();
                tracing::warn!(?event, "webhook queue full: event dropped");
                let broker = self.broker.clone();
                tokio::spawn(async move {
                    let (channel, place) = (&event.channel, event.place);
                    retry(|| broker.presence_dropped(channel, place)).await
                });
            }
        }
    }

    /// Sends the events of one lane in order, each once its turn came and
    /// until it is answered 2xx; returns when the lane is closed.
    pub async fn run_lane(&self, mut lane: Lane) {
        while let Some(event) = lane.recv().await {
            let (channel, place) = (&*event.channel, event.place);
            loop {
                match self.broker.presence_turn(channel, place).await {
                    Ok(true) => break,
                    Ok(false) => tokio::time::sleep(TURN_POLL).await,
                    Err(_) => tokio::time::sleep(FIRST_BACKOFF).await,
                }
            }
            self.deliver(&event).await;
            retry(|| self.broker.presence_sent(channel, place)).await;
            metrics::WEBHOOK_QUEUE.dec();
            metrics::WEBHOOKS_SENT
                .with_label_values(&[event.event.name()])
                .inc();
        }
    }

    /// POSTs `event` until the receiver answers 2xx.
    async fn deliver(&self, event: &Event) {
        let body = event.body();
        let mut backoff = FIRST_BACKOFF;
        loop {
            let failure = match self.post(&body).await {
                Ok(status) if (200..300).contains(&status) => return,
                Ok(status) => format!("answered {status}"),
                Err(e) => e.to_string(),
            };
            metrics::WEBHOOK_RETRIES.inc();
            tracing::warn!(id = %event.id, event = event.event.name(), channel = %event.channel, %failure, retry_in = ?backoff, "webhook not delivered");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One attempt; returns the receiver's status.
    async fn post(&self, body: &Bytes) -> pingora::Result<u16> {
        let pool = self.upstreams.get(&self.upstream).ok_or_else(|| {
            pingora::Error::explain(
                pingora::ErrorType::InternalError,
                "unknown webhooks upstream",
            )
        })?;
        let mut request = RequestHeader::build(http::Method::POST, self.path.as_bytes(), None)?;
        let host = pool
            .config
            .sni
            .clone()
            .or_else(|| pool.config.addrs.first().cloned());
        request.insert_header(http::header::HOST, host.unwrap_or_default())?;
        request.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        request.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        request.insert_header("Pollgate-Signature", signature(&self.secret, body))?;
        let answer = self
            .upstreams
            .exchange(pool, &request, body.clone(), MAX_ANSWER)
            .await?;
        Ok(answer.header.status.as_u16())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;

    /// Events of one channel past its lane's room (no lane runs here) are
    /// dropped and counted; those of the configured events only are queued.
    #[tokio::test]
    async fn a_full_lane_drops_and_counts() {
        let config = WebhooksConfig {
            upstream: Some("app".into()),
            events: vec![WebhookEvent::SubscriberJoined],
            secret: "k".into(),
            ..WebhooksConfig::default()
        };
        let broker = Arc::new(MemoryBroker::new(10, Duration::from_secs(60), 100));
        let upstreams = Arc::new(Upstreams::new(&Default::default()));
        let life = Arc::new(Lifecycle::default());
        let (hooks, _lanes) = Webhooks::new(&config, upstreams, broker, life).unwrap();
        let change = |subscriber: Option<&str>| PresenceChange {
            channel: "room:1".into(),
            subscriber: subscriber.map(Arc::from),
            present: true,
            at: 1,
        };
        assert!(
            !hooks.wants(&change(None)),
            "channel_occupied is not asked for"
        );
        assert!(hooks.wants(&change(Some("ann"))));
        let dropped = metrics::WEBHOOKS_DROPPED.get();
        for _ in 0..QUEUE / LANES + 7 {
            hooks.send(&change(Some("ann")), 0);
        }
        assert_eq!(metrics::WEBHOOKS_DROPPED.get() - dropped, 7);
    }

    /// RFC 4231, test case 2.
    #[test]
    fn the_signature_is_the_hex_hmac_sha256_of_the_body() {
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn the_body_names_the_subscriber_only_when_there_is_one() {
        let mut e = Event {
            id: "i-1".into(),
            event: WebhookEvent::SubscriberJoined,
            channel: "room:1".into(),
            subscriber: Some("ann".into()),
            at: 7,
            place: 1,
            _in_flight: Lifecycle::default().enter(),
        };
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": "i-1", "event": "subscriber_joined", "channel": "room:1", "subscriber": "ann", "at": 7})
        );
        e.subscriber = None;
        e.event = WebhookEvent::ChannelVacated;
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v.get("subscriber"), None);
        assert_eq!(v["event"], "channel_vacated");
    }
}
