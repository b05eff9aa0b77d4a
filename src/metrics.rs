//! Prometheus metrics (docs/api.md, "Metrics"), registered in the default registry that
//! Pingora's own metrics use, and served by the admin listener.

use prometheus::{
    register_histogram, register_histogram_vec, register_int_counter, register_int_counter_vec,
    register_int_gauge, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge,
};
use std::sync::LazyLock;

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Announcements waiting for the hub's delivery task.
pub static DELIVERY_QUEUE: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "pollgate_delivery_queue",
        "Announcements waiting for the hub's delivery task (at most broker.delivery_queue)"
    )
    .unwrap()
});

/// Announcements refused because the hub's delivery queue was full.
pub static DELIVERY_OVERFLOWS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "pollgate_delivery_queue_overflows_total",
        "Announcements refused because the hub's delivery queue was full (the Redis broker then reconnects and catches up)"
    )
    .unwrap()
});

/// Webhook events sent (answered 2xx), by event.
pub static WEBHOOKS_SENT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "pollgate_webhook_events_sent_total",
        "Presence webhook events the receiver accepted (2xx), by event",
        &["event"]
    )
    .unwrap()
});

/// Webhook attempts that failed (and are retried).
pub static WEBHOOK_RETRIES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "pollgate_webhook_retries_total",
        "Presence webhook requests that failed or were not answered 2xx, and are retried"
    )
    .unwrap()
});

/// Webhook events dropped because the queue was full.
pub static WEBHOOKS_DROPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "pollgate_webhook_events_dropped_total",
        "Presence webhook events dropped because the instance's queue was full"
    )
    .unwrap()
});

/// Webhook events waiting to be sent.
pub static WEBHOOK_QUEUE: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "pollgate_webhook_queue",
        "Presence webhook events waiting to be sent (or being retried)"
    )
    .unwrap()
});

/// Long-polls currently held.
pub static HELD: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("pollgate_held_requests", "Long-polls currently held").unwrap()
});

/// A gauge held one higher for as long as the guard lives: [`GaugeGuard::up`]
/// increments it and dropping the guard decrements it, however its holder
/// ends (returned, dropped while suspended at an `.await` because the
/// request's task was cancelled, or unwinding from a panic). One pointer,
/// no allocation.
#[must_use = "the gauge goes back down as soon as the guard is dropped"]
pub struct GaugeGuard(&'static IntGauge);

impl GaugeGuard {
    /// Increments `gauge`; returns the guard that decrements it on drop.
    pub fn up(gauge: &'static IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Watch requests currently held.
pub static HELD_WATCHERS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "pollgate_held_watchers",
        "Watch requests currently held (also counted in pollgate_held_requests)"
    )
    .unwrap()
});

/// Upstream fetches of watch routes, by outcome.
pub static WATCH_FETCHES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "pollgate_watch_fetches_total",
        "Upstream GETs of watch routes by outcome (ok, error), shared by the watchers of one change",
        &["outcome"]
    )
    .unwrap()
});

/// Subscribe requests by outcome.
pub static SUBSCRIBES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "pollgate_subscribe_requests_total",
        "Subscribe requests by outcome (message, timeout, gap, rejected, error, disconnected)",
        &["outcome"]
    )
    .unwrap()
});

/// Messages accepted by a publish.
pub static PUBLISHED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!("pollgate_messages_published_total", "Messages published").unwrap()
});

/// Messages written to subscribers (one per message per subscriber).
pub static DELIVERED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "pollgate_messages_delivered_total",
        "Messages written to subscribers"
    )
    .unwrap()
});

/// Publish accepted (or received from the broker) to answer written.
pub static DELIVERY_LATENCY: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "pollgate_delivery_latency_seconds",
        "Time from a publish being accepted to a held subscriber's answer being written",
        LATENCY_BUCKETS.to_vec()
    )
    .unwrap()
});

/// Channels this instance tracks (with held polls or a recent local window).
pub static CHANNELS_ACTIVE: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "pollgate_channels_active",
        "Channels tracked by this instance"
    )
    .unwrap()
});

/// Channels whose history the memory broker keeps (at most
/// `limits.max_channels_kept`; always 0 with Redis, which keeps them).
pub static CHANNELS_KEPT: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "pollgate_channels_kept",
        "Channels whose history this instance keeps in memory (memory broker)"
    )
    .unwrap()
});

/// Channels whose history was dropped to make room for a new one
/// (`limits.max_channels_kept`).
pub static CHANNELS_EVICTED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "pollgate_channels_evicted_total",
        "Channels without held polls whose history was dropped, least recently published first, to keep limits.max_channels_kept"
    )
    .unwrap()
});

/// 1 while the broker is reachable.
pub static BROKER_UP: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("pollgate_broker_up", "1 while the broker is reachable").unwrap()
});

/// Broker reconnections.
pub static BROKER_RECONNECTS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "pollgate_broker_reconnects_total",
        "Reconnections to the broker"
    )
    .unwrap()
});

/// Failovers followed: the Redis master the broker writes to changed
/// (behind Sentinel: another server was named and confirmed master).
pub static BROKER_FAILOVERS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "pollgate_broker_failovers_total",
        "Failovers of the Redis master followed by the broker"
    )
    .unwrap()
});

/// Loss notices appended after a failover lost writes this instance had
/// seen (see `docs/redis.md`).
pub static LOSS_NOTICES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "pollgate_loss_notices_total",
        "Loss notices this instance appended to channels after a Redis failover lost writes"
    )
    .unwrap()
});

/// Requests sent to upstreams by upstream and status.
pub static UPSTREAM_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "pollgate_upstream_requests_total",
        "Requests proxied to upstreams",
        &["upstream", "status"]
    )
    .unwrap()
});

/// Upstream answer latency by upstream.
pub static UPSTREAM_LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "pollgate_upstream_latency_seconds",
        "Upstream answer latency",
        &["upstream"],
        LATENCY_BUCKETS.to_vec()
    )
    .unwrap()
});

/// Publishes after a 2xx upstream answer, by result (ok, failed).
pub static PUBLISH_THROUGH: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "pollgate_publish_through_total",
        "Publishes of proxied answers (publish-through and header-directed) by result",
        &["result"]
    )
    .unwrap()
});

/// Messages that arrived (through Redis) with a content type that is not a
/// media type, served as `application/octet-stream`.
pub static BAD_CONTENT_TYPES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "pollgate_bad_content_types_total",
        "Messages received with an invalid content type, served as application/octet-stream"
    )
    .unwrap()
});

/// Requests or connections refused to protect the instance, by reason.
pub static REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "pollgate_refused_total",
        "Requests or connections refused to protect the instance, by reason",
        &["reason"]
    )
    .unwrap()
});

/// Why a request or connection was refused (the label of [`REFUSED`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A request head over `limits.max_head` (431).
    HeaderTooLarge,
    /// A request head not received within `limits.header_timeout` (408).
    HeaderTimeout,
    /// A client that accepted no bytes for `limits.write_timeout`.
    WriteTimeout,
    /// `limits.max_held` polls are already held (503).
    MaxHeld,
    /// `limits.max_active_channels` channels are already active (503).
    MaxActiveChannels,
    /// A publish to a new channel while `limits.max_channels_kept` channels
    /// are kept and every one has held polls (503).
    MaxChannelsKept,
    /// `broker.max_pending` commands are already in flight (503).
    BrokerBusy,
    /// The broker is unreachable (503).
    BrokerDown,
    /// A request target that is refused (400).
    BadTarget,
    /// A client already holds `limits.max_held_per_client` requests (429).
    MaxHeldPerClient,
    /// A client is over `limits.polls_per_client` new requests a second (429).
    PollsPerClient,
}

impl Refusal {
    const ALL: [Refusal; 11] = [
        Refusal::HeaderTooLarge,
        Refusal::HeaderTimeout,
        Refusal::WriteTimeout,
        Refusal::MaxHeld,
        Refusal::MaxActiveChannels,
        Refusal::MaxChannelsKept,
        Refusal::BrokerBusy,
        Refusal::BrokerDown,
        Refusal::BadTarget,
        Refusal::MaxHeldPerClient,
        Refusal::PollsPerClient,
    ];

    fn label(self) -> &'static str {
        match self {
            Refusal::HeaderTooLarge => "header_too_large",
            Refusal::HeaderTimeout => "header_timeout",
            Refusal::WriteTimeout => "write_timeout",
            Refusal::MaxHeld => "max_held",
            Refusal::MaxActiveChannels => "max_active_channels",
            Refusal::MaxChannelsKept => "max_channels_kept",
            Refusal::BrokerBusy => "broker_busy",
            Refusal::BrokerDown => "broker_down",
            Refusal::BadTarget => "bad_target",
            Refusal::MaxHeldPerClient => "max_held_per_client",
            Refusal::PollsPerClient => "polls_per_client",
        }
    }

    /// Counts one refusal for this reason.
    pub fn count(self) {
        REFUSED.with_label_values(&[self.label()]).inc();
    }
}

/// Outcome label of a subscribe request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Outcome {
    Message,
    Timeout,
    Gap,
    Rejected,
    Error,
    Disconnected,
}

impl Outcome {
    const ALL: [Outcome; 6] = [
        Outcome::Message,
        Outcome::Timeout,
        Outcome::Gap,
        Outcome::Rejected,
        Outcome::Error,
        Outcome::Disconnected,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Message => "message",
            Outcome::Timeout => "timeout",
            Outcome::Gap => "gap",
            Outcome::Rejected => "rejected",
            Outcome::Error => "error",
            Outcome::Disconnected => "disconnected",
        }
    }

    /// Counts one subscribe request with this outcome (on its counter,
    /// looked up once: it is counted for every answer).
    pub fn count(self) {
        static COUNTERS: LazyLock<Vec<IntCounter>> = LazyLock::new(|| {
            Outcome::ALL
                .iter()
                .map(|o| SUBSCRIBES.with_label_values(&[o.label()]))
                .collect()
        });
        COUNTERS[self as usize].inc();
    }
}

/// Registers every metric so that `/metrics` lists them from the start.
pub fn init() {
    LazyLock::force(&HELD);
    for o in Outcome::ALL {
        SUBSCRIBES.with_label_values(&[o.label()]);
    }
    LazyLock::force(&PUBLISHED);
    LazyLock::force(&DELIVERED);
    LazyLock::force(&DELIVERY_LATENCY);
    LazyLock::force(&CHANNELS_ACTIVE);
    LazyLock::force(&CHANNELS_KEPT);
    LazyLock::force(&CHANNELS_EVICTED);
    LazyLock::force(&BROKER_UP);
    LazyLock::force(&BROKER_RECONNECTS);
    LazyLock::force(&BROKER_FAILOVERS);
    LazyLock::force(&LOSS_NOTICES);
    LazyLock::force(&DELIVERY_QUEUE);
    LazyLock::force(&DELIVERY_OVERFLOWS);
    LazyLock::force(&UPSTREAM_REQUESTS);
    LazyLock::force(&UPSTREAM_LATENCY);
    for r in ["ok", "failed"] {
        PUBLISH_THROUGH.with_label_values(&[r]);
    }
    LazyLock::force(&HELD_WATCHERS);
    LazyLock::force(&BAD_CONTENT_TYPES);
    for o in ["ok", "error"] {
        WATCH_FETCHES.with_label_values(&[o]);
    }
    for r in Refusal::ALL {
        REFUSED.with_label_values(&[r.label()]);
    }
    LazyLock::force(&WEBHOOK_RETRIES);
    LazyLock::force(&WEBHOOKS_DROPPED);
    LazyLock::force(&WEBHOOK_QUEUE);
}

/// The default registry in Prometheus text format.
pub fn render() -> Vec<u8> {
    use prometheus::Encoder;
    let mut out = Vec::new();
    let _ = prometheus::TextEncoder::new().encode(&prometheus::gather(), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gauge_guard_holds_the_gauge_up_until_dropped() {
        static GAUGE: LazyLock<IntGauge> =
            LazyLock::new(|| IntGauge::new("guard_test", "a gauge of this test only").unwrap());
        let first = GaugeGuard::up(&GAUGE);
        let second = GaugeGuard::up(&GAUGE);
        assert_eq!(GAUGE.get(), 2);
        drop(first);
        assert_eq!(GAUGE.get(), 1);
        drop(second);
        assert_eq!(GAUGE.get(), 0);
        assert_eq!(
            std::mem::size_of::<GaugeGuard>(),
            std::mem::size_of::<usize>()
        );
    }

    #[test]
    fn each_outcome_counts_on_its_own_label() {
        for (i, o) in Outcome::ALL.into_iter().enumerate() {
            assert_eq!(o as usize, i, "Outcome::ALL is in declaration order");
            let before = SUBSCRIBES.with_label_values(&[o.label()]).get();
            o.count();
            assert_eq!(SUBSCRIBES.with_label_values(&[o.label()]).get(), before + 1);
        }
    }
}
