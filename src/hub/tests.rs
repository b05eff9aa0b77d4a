//! The hub's unit tests: fan-out, cursors, races, lower ids, ahead
//! cursors, the channel cap (over the memory broker, counting its reads).

use super::*;
use crate::broker::memory::MemoryBroker;
use crate::broker::Sink;
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::atomic::AtomicUsize;

/// The memory broker, counting the history reads the hub makes.
struct Counting {
    inner: MemoryBroker,
    reads: AtomicUsize,
}

#[async_trait]
impl Broker for Counting {
    async fn publish(
        &self,
        ch: &str,
        ct: String,
        data: Bytes,
    ) -> Result<Arc<Message>, BrokerError> {
        self.inner.publish(ch, ct, data).await
    }
    fn instance(&self) -> &str {
        "counting"
    }

    fn address(&self) -> String {
        self.inner.address()
    }
    async fn history(&self, ch: &str) -> Result<History, BrokerError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.history(ch).await
    }
    fn set_sink(&self, sink: Arc<dyn Sink>) {
        self.inner.set_sink(sink)
    }
    fn epoch(&self) -> crate::cursor::Epoch {
        self.inner.epoch()
    }
}

fn hub() -> (Arc<Hub>, Arc<Counting>) {
    let broker = Arc::new(Counting {
        inner: MemoryBroker::new(100, Duration::from_secs(60), 1000),
        reads: AtomicUsize::new(0),
    });
    (
        Hub::new(
            broker.clone(),
            100,
            Duration::from_secs(30),
            1000,
            DELIVERY_QUEUE,
        ),
        broker,
    )
}

async fn publish(b: &Counting, ch: &str, text: &'static str) -> Arc<Message> {
    b.publish(ch, "text/plain".into(), Bytes::from_static(text.as_bytes()))
        .await
        .unwrap()
}

async fn answer(mut h: Held) -> Arc<Answer> {
    match h.woken().await {
        Wake::Answer(a) => a,
        other => panic!("unexpected {other:?}"),
    }
}

/// A poll of `names` from their newest message, held.
async fn held_newest(hub: &Hub, names: &[String]) -> Held {
    held(
        hub.poll(names, None, First::Newest, Format::Envelope)
            .await
            .unwrap(),
    )
}

fn held(p: Polled) -> Held {
    match p {
        Polled::Held(h) => h,
        Polled::Ready(a) => panic!("expected a hold, got {a:?}"),
    }
}

#[tokio::test]
async fn one_publish_wakes_every_waiter_with_one_shared_answer_and_no_broker_call() {
    let (hub, broker) = hub();
    let names = vec!["room".to_string()];
    let mut waiters = Vec::new();
    for _ in 0..1000 {
        waiters.push(held_newest(&hub, &names).await);
    }
    assert_eq!(
        broker.reads.load(Ordering::Relaxed),
        1,
        "one window load for the channel"
    );
    let m = publish(&broker, "room", "hi").await;
    let mut answers = Vec::new();
    for w in waiters {
        answers.push(answer(w).await);
    }
    assert!(
        answers.iter().all(|a| Arc::ptr_eq(a, &answers[0])),
        "encoded once"
    );
    assert_eq!(answers[0].messages[0].id, m.id);
    // Everyone re-polls with the new cursor: answered from the window.
    let cursor = answers[0].cursor.clone();
    for _ in 0..1000 {
        held(
            hub.poll(
                &names,
                Some(cursor.clone()),
                First::Newest,
                Format::Envelope,
            )
            .await
            .unwrap(),
        );
    }
    let late = Cursor(smallvec::smallvec![MessageId::ZERO], Some(broker.epoch()));
    match hub
        .poll(&names, Some(late), First::Newest, Format::Envelope)
        .await
        .unwrap()
    {
        Polled::Ready(a) => assert_eq!(a.messages.len(), 1),
        Polled::Held(_) => panic!("a client behind gets the window at once"),
    }
    assert_eq!(
        broker.reads.load(Ordering::Relaxed),
        1,
        "no broker call per poll"
    );
}

#[tokio::test]
async fn waiters_with_different_cursors_get_their_own_answers() {
    let (hub, broker) = hub();
    let names = vec!["a".to_string(), "b".to_string()];
    let first = held_newest(&hub, &names).await;
    let m = publish(&broker, "b", "1").await;
    let after = answer(first).await;
    assert_eq!(after.cursor.0[..], [MessageId::ZERO, m.id]);
    let w1 = held(
        hub.poll(
            &names,
            Some(after.cursor.clone()),
            First::Newest,
            Format::Envelope,
        )
        .await
        .unwrap(),
    );
    let w2 = held_newest(&hub, &names[..1]).await;
    let n = publish(&broker, "a", "2").await;
    let (a1, a2) = (answer(w1).await, answer(w2).await);
    assert_eq!(a1.cursor.0[..], [n.id, m.id]);
    assert_eq!(a2.cursor.0[..], [n.id]);
}

fn msg(ms: u64, channel: &str) -> Arc<Message> {
    Arc::new(Message::new(
        MessageId { ms, seq: 0 },
        channel.into(),
        "text/plain".into(),
        Bytes::from_static(b"x"),
    ))
}

fn ready(p: Polled) -> Arc<Answer> {
    match p {
        Polled::Ready(a) => a,
        Polled::Held(_) => panic!("expected an answer at once"),
    }
}

#[tokio::test]
async fn a_poll_without_cursor_keeps_a_message_that_lands_before_it_registers() {
    let (hub, broker) = hub();
    let names = vec!["race".to_string()];
    let _ = hub.channel("race").await.unwrap();
    // The message lands after the poll chose its start, before it waits.
    let h = hub.clone();
    *hub.before_register.lock() = Some(Box::new(move || h.deliver(msg(5, "race"))));
    let answer = ready(
        hub.poll(&names, None, First::Newest, Format::Envelope)
            .await
            .unwrap(),
    );
    assert_eq!(answer.messages[0].id.ms, 5, "not skipped");
    assert!(!answer.gap);
    drop(broker);
}

#[tokio::test]
async fn an_id_going_backwards_wakes_waiters_with_a_gap() {
    let (hub, broker) = hub();
    let names = vec!["reset".to_string()];
    let first = publish(&broker, "reset", "before").await;
    let mut w = held(
        hub.poll(
            &names,
            Some(Cursor(smallvec::smallvec![first.id], Some(broker.epoch()))),
            First::Newest,
            Format::Envelope,
        )
        .await
        .unwrap(),
    );
    // The channel's history was deleted and begins again, lower.
    let restarted = msg(first.id.ms - 1000, "reset");
    hub.deliver(restarted.clone());
    let wake = tokio::time::timeout(Duration::from_secs(1), w.woken())
        .await
        .expect("woken, not left waiting");
    assert!(
        matches!(wake, Wake::Repoll),
        "sent back to poll, to learn of the gap"
    );
    assert_eq!(
        hub.lookup_channel("reset")
            .unwrap()
            .state
            .lock()
            .window
            .last_id(),
        restarted.id
    );
}

#[tokio::test]
async fn cursors_ahead_of_the_channel_are_a_gap_without_a_read_per_poll() {
    let (hub, broker) = hub();
    let names = vec!["future".to_string()];
    let kept = publish(&broker, "future", "kept").await;
    let reads = broker.reads.load(Ordering::Relaxed);
    let made_up = Cursor(
        smallvec::smallvec![MessageId {
            ms: kept.id.ms + 10_000_000,
            seq: 0,
        }],
        Some(broker.epoch()),
    );
    for _ in 0..50 {
        let a = ready(
            hub.poll(
                &names,
                Some(made_up.clone()),
                First::Newest,
                Format::Envelope,
            )
            .await
            .unwrap(),
        );
        assert!(a.gap, "a cursor never issued is a gap");
        assert_eq!(a.messages[0].id, kept.id, "with what is retained");
        assert_eq!(a.cursor.0[0], kept.id, "and a cursor that is valid");
    }
    assert!(
        broker.reads.load(Ordering::Relaxed) - reads <= 2,
        "one window load and one shared check, not one read per poll"
    );
}

#[tokio::test]
async fn active_channels_are_capped() {
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new(10, Duration::from_secs(60), 1000));
    let hub = Hub::new(broker, 10, Duration::ZERO, 2, DELIVERY_QUEUE);
    let poll = |name: &str| {
        let names = vec![name.to_string()];
        let hub = hub.clone();
        async move {
            hub.poll(&names, None, First::Newest, Format::Envelope)
                .await
        }
    };
    let (a, b) = (poll("a").await.unwrap(), poll("b").await.unwrap());
    assert!(matches!(poll("c").await, Err(HubError::TooManyChannels(2))));
    assert!(poll("a").await.is_ok(), "known channels still serve");
    drop((a, b));
    hub.sweep();
    assert_eq!(hub.active_channels(), 0);
    assert!(
        poll("c").await.is_ok(),
        "room again once idle ones are swept"
    );
}

#[tokio::test]
async fn a_dropped_waiter_leaves_its_channels_and_idle_channels_are_swept() {
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new(10, Duration::from_secs(60), 1000));
    let hub = Hub::new(broker, 10, Duration::ZERO, 1000, DELIVERY_QUEUE);
    let names = vec!["x".to_string(), "y".to_string()];
    let w = held_newest(&hub, &names).await;
    assert_eq!(hub.info("x").await.unwrap().subscribers, 1);
    hub.sweep();
    assert!(
        hub.lookup_channel("x").is_some(),
        "kept while a waiter holds it"
    );
    drop(w);
    assert_eq!(hub.info("y").await.unwrap().subscribers, 0);
    hub.sweep();
    assert!(hub.lookup_channel("x").is_none() && hub.lookup_channel("y").is_none());
}

#[tokio::test]
async fn a_drain_releases_every_held_poll_once() {
    let (hub, _) = hub();
    let one = vec!["a".to_string()];
    let two = vec!["a".to_string(), "b".to_string()];
    let first = held_newest(&hub, &one).await;
    let both = held_newest(&hub, &two).await;
    assert_eq!(hub.info("a").await.unwrap().subscribers, 2);
    hub.release_all();
    for mut h in [first, both] {
        assert!(matches!(h.woken().await, Wake::Drain));
    }
    assert_eq!(hub.info("a").await.unwrap().subscribers, 0);
    assert_eq!(hub.info("b").await.unwrap().subscribers, 0);
}

#[tokio::test]
async fn a_poll_at_the_newest_message_of_a_known_channel_is_held_at_once() {
    let (hub, broker) = hub();
    let names = vec!["room".to_string()];
    let first = held_newest(&hub, &names).await;
    let at = first.cursor().clone();
    // Unknown channel: it must be loaded first.
    let other = vec!["other".to_string()];
    assert!(hub.hold_now(&other, &at, Format::Envelope, None).is_none());
    let now = hub
        .hold_now(&names, &at, Format::Envelope, None)
        .expect("held at once");
    publish(&broker, "room", "m1").await;
    for h in [first, now] {
        assert_eq!(answer(h).await.messages.len(), 1, "both waiters are woken");
    }
    // Behind the newest message: answered by the full poll, not held.
    assert!(hub.hold_now(&names, &at, Format::Envelope, None).is_none());
    assert_eq!(broker.reads.load(Ordering::Relaxed), 1, "no broker call");
}

/// An answerer counting the answers it was asked to write.
#[derive(Default)]
struct Recording(AtomicUsize);

impl Answerer for Recording {
    fn answer(&self, _: &Arc<Answer>) -> bool {
        self.0.fetch_add(1, Ordering::SeqCst);
        false // the poll's task is woken, as a test's poll waits for it
    }
}

#[tokio::test]
async fn a_stopped_poll_gets_no_answer_written_and_a_fired_one_hands_its_wake_up_to_stop() {
    let (hub, broker) = hub();
    let names = vec!["room".to_string()];
    let recording = Arc::new(Recording::default());
    let answerer: Arc<dyn Answerer> = recording.clone();
    let poll = |answerer: Option<Arc<dyn Answerer>>| {
        hub.poll_answered_by(&names, None, First::Newest, Format::Envelope, answerer)
    };
    // Stopped (its timeout, say) before the message: nothing is written.
    let mut stopped = held(poll(Some(answerer.clone())).await.unwrap());
    assert!(stopped.stop().is_none());
    // Fired before its task got to it: the answer was written, and stop
    // hands over the wake-up instead of losing it.
    let mut fired = held(poll(Some(answerer.clone())).await.unwrap());
    publish(&broker, "room", "m1").await;
    match fired.stop() {
        Some(Wake::Answer(a)) => assert_eq!(a.messages.len(), 1),
        other => panic!("expected the answer, got {other:?}"),
    }
    assert_eq!(recording.0.load(Ordering::SeqCst), 1, "one answer written");
    // Stopped once is stopped for good.
    assert!(fired.stop().is_none() && stopped.stop().is_none());
    // Dropped unstopped, then a message: nothing written either.
    drop(held(poll(Some(answerer)).await.unwrap()));
    publish(&broker, "room", "m2").await;
    assert_eq!(recording.0.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_cursor_of_another_history_is_a_gap_even_at_the_empty_channels_start() {
    let (hub, broker) = hub();
    let names = vec!["restarted".to_string()];
    let before = broker.epoch() - 1;
    // The empty channel's cursor from before a restart: a gap, not a hold.
    let empty = Cursor(smallvec::smallvec![MessageId::ZERO], Some(before));
    let a = ready(
        hub.poll(&names, Some(empty), First::Newest, Format::Envelope)
            .await
            .unwrap(),
    );
    assert!(a.gap);
    assert_eq!(a.cursor.to_string(), format!("0-0_{}", broker.epoch()));
    // What this history retains comes with the gap, from its start.
    let m = publish(&broker, "restarted", "after").await;
    let old = Cursor(smallvec::smallvec![MessageId::ZERO], Some(before));
    let a = ready(
        hub.poll(&names, Some(old), First::Newest, Format::Envelope)
            .await
            .unwrap(),
    );
    assert!(a.gap);
    assert_eq!(a.messages.len(), 1);
    assert_eq!(a.messages[0].id, m.id);
    // A cursor issued before epochs is read by its ids alone, and the
    // answer carries the epoch.
    let legacy = Cursor(smallvec::smallvec![MessageId::ZERO], None);
    let a = ready(
        hub.poll(&names, Some(legacy), First::Newest, Format::Envelope)
            .await
            .unwrap(),
    );
    assert!(!a.gap);
    assert_eq!(a.cursor.1, Some(broker.epoch()));
}

/// Counts the answers written straight from the delivering task.
#[derive(Default)]
struct Written(AtomicUsize);

impl crate::waiter::Answerer for Written {
    fn answer(&self, _: &Arc<Answer>) -> bool {
        self.0.fetch_add(1, Ordering::SeqCst);
        false // the poll's task is woken, as a test's poll waits for it
    }
}

#[tokio::test]
async fn a_registration_that_fails_part_way_is_answered_exactly_once() {
    use crate::waiter::{Answerer, Waiter, Wake};
    let (hub, _broker) = hub();
    let names = vec!["pa".to_string(), "pb".to_string()];
    for n in &names {
        let _ = hub.channel(n).await.unwrap();
    }
    // A delivery took the waiter off its first channel, and fires it only
    // once the registration failed on the second (which moved): nothing
    // may be written for it then, the poll answers by itself.
    let written = Arc::new(Written::default());
    let answerer: Arc<dyn Answerer> = written.clone();
    let taken: Arc<Mutex<Option<Arc<Waiter>>>> = Arc::default();
    let (h, t) = (hub.clone(), taken.clone());
    *hub.between_channels.lock() = Some(Box::new(move |w: &Arc<Waiter>| {
        *t.lock() = Some(w.clone());
        h.deliver(msg(5, "pb"));
    }));
    let poll = hub.poll_answered_by(
        &names,
        None,
        First::Newest,
        Format::Envelope,
        Some(answerer.clone()),
    );
    let a = ready(poll.await.unwrap());
    assert_eq!(a.messages[0].id.ms, 5);
    let late = taken.lock().take().unwrap();
    assert!(
        !late.fire(Wake::Answer(a)),
        "a withdrawn waiter fires no more"
    );
    assert_eq!(written.0.load(Ordering::SeqCst), 0, "no second answer");

    // The delivery fired it first: its answer is the poll's, not one more.
    let h = hub.clone();
    *hub.between_channels.lock() = Some(Box::new(move |_: &Arc<Waiter>| {
        h.deliver(msg(7, "pa"));
        h.deliver(msg(8, "pb"));
    }));
    let cursor = Cursor(
        smallvec::smallvec![MessageId::ZERO, MessageId { ms: 5, seq: 0 }],
        Some(_broker.epoch()),
    );
    let poll = hub.poll_answered_by(
        &names,
        Some(cursor),
        First::Newest,
        Format::Envelope,
        Some(answerer),
    );
    let mut held = held(poll.await.unwrap());
    assert_eq!(
        written.0.load(Ordering::SeqCst),
        1,
        "written once, by the delivery"
    );
    match held.woken().await {
        Wake::Answer(a) => assert_eq!(a.messages[0].id.ms, 7),
        other => panic!("expected the delivered answer, got {other:?}"),
    }
}

/// Trust, round 2: on the memory broker a publish waits for room in the
/// bounded delivery queue. Publishers far faster than delivery never
/// queue past the bound, and a subscriber gets every message, each
/// publisher's in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_publishes_wait_for_room_in_the_bounded_delivery_queue() {
    const BOUND: usize = 2;
    const PUBLISHERS: usize = 4;
    const EACH: usize = 200;
    let broker = Arc::new(MemoryBroker::new(1000, Duration::from_secs(60), 1000));
    let hub = Hub::new(broker.clone(), 1000, Duration::from_secs(30), 1000, BOUND);
    tokio::spawn(hub.clone().run_deliveries());
    while hub.deliveries.get().is_none() {
        tokio::task::yield_now().await;
    }
    let names = vec!["burst".to_string()];
    let mut held = held_newest(&hub, &names).await;
    let subscriber = tokio::spawn({
        let hub = hub.clone();
        async move {
            let mut got = Vec::new();
            while got.len() < PUBLISHERS * EACH {
                let answer = match held.woken().await {
                    Wake::Answer(answer) => answer,
                    other => panic!("unexpected {other:?}"),
                };
                let mut answer = Some(answer);
                while let Some(a) = answer.take() {
                    got.extend(a.messages.iter().map(|m| m.data.clone()));
                    match hub
                        .poll(
                            &names,
                            Some(a.cursor.clone()),
                            First::Newest,
                            Format::Envelope,
                        )
                        .await
                        .unwrap()
                    {
                        Polled::Ready(next) => answer = Some(next),
                        Polled::Held(h) => held = h,
                    }
                }
            }
            got
        }
    });
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let broker = broker.clone();
        publishers.push(tokio::spawn(async move {
            let mut most = 0;
            for i in 0..EACH {
                let data = Bytes::from(format!("{p}:{i}"));
                broker
                    .publish("burst", "text/plain".into(), data)
                    .await
                    .unwrap();
                most = most.max(metrics::DELIVERY_QUEUE.get());
            }
            most
        }));
    }
    for p in publishers {
        let most = p.await.unwrap();
        assert!(
            most <= BOUND as i64,
            "the delivery queue reached {most}, over {BOUND}"
        );
    }
    let got = tokio::time::timeout(Duration::from_secs(10), subscriber)
        .await
        .expect("every message delivered")
        .unwrap();
    assert_eq!(got.len(), PUBLISHERS * EACH, "each message once");
    for p in 0..PUBLISHERS {
        let mine: Vec<_> = got
            .iter()
            .filter(|d| d.starts_with(format!("{p}:").as_bytes()))
            .collect();
        let want: Vec<_> = (0..EACH).map(|i| Bytes::from(format!("{p}:{i}"))).collect();
        assert_eq!(
            mine,
            want.iter().collect::<Vec<_>>(),
            "publisher {p}, in order"
        );
    }
}
