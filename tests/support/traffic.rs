//! Client traffic for fault tests, and what it proves.
//!
//! - Publishers: one per channel, publishing `{"seq": n}` through the
//!   publish API at a steady pace, round robin over the live instances. A
//!   message counts as published only when the publish answered 200.
//! - Subscribers: one per channel and instance, each following its channel
//!   from cursor `0-0` with long-polls (JSON envelope) and moving on to the
//!   next live instance, cursor in hand, on a connection error or a non-200.
//! - [`Tally`]: published, delivered, lost, duplicates, out of order, gaps
//!   announced and client-visible errors. A message is *lost* for a
//!   subscriber when it was published, never received, and no gap announced
//!   by that subscriber covers it. A gap covers the messages between the
//!   last one received before it and the first one received after it, among
//!   those published before the gap was seen. A message is a *duplicate*
//!   when the subscriber had received it (its sequence number or its id)
//!   already (but for the retained history a gap's answer carries: what
//!   the subscriber had there, by id, is dropped as a client does), and *out of order* when it comes after one published after it
//!   (a higher id, or a higher sequence number of a publish answered 200).
//! - [`Tally::assert_exact`]: no loss, no duplicate, nothing out of order,
//!   and gaps exactly where the scenario causes them.
#![allow(dead_code)]

use super::fleet::Directory;
use serde_json::Value;
use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Pause between two rounds of publishes (one on each channel).
pub const INTERVAL: Duration = Duration::from_millis(40);
/// Channels published and followed (each instance holds one poll on each).
pub const CHANNELS: usize = 3;
/// Publishes per channel that show that traffic flows (1 s of it).
const FLOW: usize = 25;
/// The hold time subscribers ask for.
const HOLD: &str = "2";

/// One channel's publishing record.
#[derive(Default)]
struct Published {
    /// Sequence numbers answered 200.
    ok: Mutex<BTreeSet<u64>>,
    /// Publishes answered otherwise, or not answered.
    errors: AtomicU64,
    /// The sequence number being published now (or last).
    sending: AtomicU64,
}

/// A message id (`<ms>-<seq>`) as a pair that orders as ids do.
type Id = (u64, u64);

fn parse_id(id: &str) -> Option<Id> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// What a subscriber saw, in order.
#[derive(Clone, Copy, Debug)]
enum Event {
    /// Message `seq` of the channel's publisher, stored as `id`.
    Message { seq: u64, id: Id },
    /// A gap, seen while messages up to `published_below` had been sent;
    /// `after_fault` once [`Traffic::fault`] was called.
    Gap {
        published_below: u64,
        after_fault: bool,
    },
}

/// One subscriber's record.
#[derive(Default)]
struct Followed {
    events: Vec<Event>,
    errors: u64,
    /// Messages without a `seq` in their data or a readable id.
    unreadable: u64,
    /// Messages of a gap's answer (the retained history) that the
    /// subscriber had already, by id: dropped, not duplicates.
    resent: u64,
}

struct Subscriber {
    name: String,
    channel: usize,
    seen: Arc<Mutex<Followed>>,
    task: JoinHandle<()>,
}

/// Publishers and subscribers running against a [`Directory`].
pub struct Traffic {
    published: Vec<Arc<Published>>,
    publishers: Vec<JoinHandle<()>>,
    subscribers: Vec<Subscriber>,
    stop_publishing: watch::Sender<bool>,
    /// Per channel, the last sequence number published; set at the end.
    last: watch::Sender<Option<Vec<Option<u64>>>>,
    /// Set by [`Traffic::fault`].
    faulted: Arc<AtomicBool>,
}

/// Where a scenario's subscribers are to be told `gap: true`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gaps {
    /// Nowhere: every gap is spurious.
    None,
    /// Every subscriber, once, after [`Traffic::fault`] (the history is
    /// gone): one before it, or a second one, is spurious.
    OncePerSubscriberAfterFault,
    /// Anywhere after [`Traffic::fault`], any number: a failover may lose
    /// writes that some subscribers received (each of them is told), and
    /// whether one does depends on the instant of the fault. None before.
    AfterFault,
}

fn channel_name(c: usize) -> String {
    format!("fault{c}")
}

impl Traffic {
    /// Starts subscribers on every instance of `directory`, then publishers.
    pub fn start(directory: &Directory) -> Traffic {
        let (stop_publishing, stop) = watch::channel(false);
        let (last, last_rx) = watch::channel(None);
        let faulted = Arc::new(AtomicBool::new(false));
        let published: Vec<Arc<Published>> = (0..CHANNELS).map(|_| Arc::default()).collect();
        let mut subscribers = Vec::new();
        for home in 0..directory.len() {
            for (channel, record) in published.iter().enumerate() {
                let seen = Arc::new(Mutex::new(Followed::default()));
                let task = tokio::spawn(follow(
                    directory.clone(),
                    home,
                    channel,
                    record.clone(),
                    seen.clone(),
                    last_rx.clone(),
                    faulted.clone(),
                ));
                subscribers.push(Subscriber {
                    name: format!(
                        "subscriber of {} from instance {home}",
                        channel_name(channel)
                    ),
                    channel,
                    seen,
                    task,
                });
            }
        }
        let publishers = published
            .iter()
            .enumerate()
            .map(|(c, p)| tokio::spawn(publish(directory.clone(), c, p.clone(), stop.clone())))
            .collect();
        Traffic {
            published,
            publishers,
            subscribers,
            stop_publishing,
            last,
            faulted,
        }
    }

    /// Marks the moment the scenario's fault begins: gaps seen from now on
    /// are told apart from those seen before (see [`Gaps`]).
    pub fn fault(&self) {
        self.faulted.store(true, Ordering::Relaxed);
    }

    /// Waits until every channel has had [`FLOW`] more publishes answered 200.
    pub async fn flowing(&self) {
        let count = |p: &Published| p.ok.lock().unwrap().len();
        let from: Vec<usize> = self.published.iter().map(|p| count(p)).collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self
            .published
            .iter()
            .zip(&from)
            .any(|(p, from)| count(p) < from + FLOW)
        {
            assert!(Instant::now() < deadline, "publishing does not resume");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops publishing, lets every subscriber catch up with the last
    /// message of its channel (10 s at most), counts, and prints the tally
    /// under `scenario` (visible with `--nocapture`).
    pub async fn finish(self, scenario: &str) -> Tally {
        self.stop_publishing.send_replace(true);
        for p in self.publishers {
            p.await.unwrap();
        }
        let published: Vec<BTreeSet<u64>> = self
            .published
            .iter()
            .map(|p| p.ok.lock().unwrap().clone())
            .collect();
        self.last
            .send_replace(Some(published.iter().map(|p| p.last().copied()).collect()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && self.subscribers.iter().any(|s| !s.task.is_finished()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut tally = Tally {
            published: published.iter().map(BTreeSet::len).sum(),
            publish_errors: self
                .published
                .iter()
                .map(|p| p.errors.load(Ordering::Relaxed))
                .sum(),
            subscribers: self.subscribers.len(),
            ..Tally::default()
        };
        for s in &self.subscribers {
            s.task.abort();
            tally.add(&s.name, &s.seen.lock().unwrap(), &published[s.channel]);
        }
        println!("{scenario}: {tally}");
        tally
    }
}

/// Publishes `{"seq": n}` on channel `c` every [`INTERVAL`] until `stop`.
async fn publish(
    directory: Directory,
    c: usize,
    record: Arc<Published>,
    mut stop: watch::Receiver<bool>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for seq in 0u64.. {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        record.sending.store(seq, Ordering::Relaxed);
        let Some((_, ports)) = directory.pick(c + seq as usize) else {
            record.errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let answer = client
            .post(format!(
                "http://127.0.0.1:{}/v1/publish/{}",
                ports.admin,
                channel_name(c)
            ))
            .header("Content-Type", "application/json")
            .body(format!("{{\"seq\":{seq}}}"))
            .send()
            .await;
        match answer {
            Ok(a) if a.status() == 200 => {
                record.ok.lock().unwrap().insert(seq);
            }
            _ => {
                record.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// True once the subscriber has the last message of its channel.
fn done(last: &Option<Vec<Option<u64>>>, channel: usize, received: Option<u64>) -> bool {
    match last {
        Some(last) => last[channel].is_none_or(|l| received.is_some_and(|r| r >= l)),
        None => false,
    }
}

/// Resolves once `done` holds for `received`.
async fn until_done(
    last: &mut watch::Receiver<Option<Vec<Option<u64>>>>,
    channel: usize,
    received: Option<u64>,
) {
    loop {
        if done(&last.borrow_and_update(), channel, received) {
            return;
        }
        if last.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Follows channel `c` with cursors, starting on instance `home`.
async fn follow(
    directory: Directory,
    home: usize,
    c: usize,
    publisher: Arc<Published>,
    seen: Arc<Mutex<Followed>>,
    mut last: watch::Receiver<Option<Vec<Option<u64>>>>,
    faulted: Arc<AtomicBool>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(8))
        .build()
        .unwrap();
    let name = channel_name(c);
    let mut at = home;
    let mut cursor = "0-0".to_string();
    let mut newest: Option<u64> = None;
    loop {
        let Some((i, ports)) = directory.pick(at) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        at = i;
        let url = format!(
            "http://127.0.0.1:{}/sub/{name}?cursor={cursor}&timeout={HOLD}",
            ports.client
        );
        let poll = async {
            let r = client.get(url).send().await?;
            let status = r.status().as_u16();
            Ok::<_, reqwest::Error>((status, r.bytes().await?))
        };
        let answer = tokio::select! {
            a = poll => a,
            _ = until_done(&mut last, c, newest) => return,
        };
        let v: Value = match answer {
            Ok((200, body)) => serde_json::from_slice(&body).unwrap_or(Value::Null),
            _ => Value::Null,
        };
        let Some(next) = v["cursor"].as_str() else {
            // Refused, failed or unreadable: try the next instance.
            seen.lock().unwrap().errors += 1;
            at += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        cursor = next.to_string();
        let mut s = seen.lock().unwrap();
        let gap = v["gap"] == true;
        if gap {
            s.events.push(Event::Gap {
                published_below: publisher.sending.load(Ordering::Relaxed) + 1,
                after_fault: faulted.load(Ordering::Relaxed),
            });
        }
        for m in v["messages"].as_array().into_iter().flatten() {
            let seq = m["data"]["seq"].as_u64();
            let id = m["id"].as_str().and_then(parse_id);
            let (Some(seq), Some(id)) = (seq, id) else {
                s.unreadable += 1;
                continue;
            };
            // A gap's answer re-sends the retained history: what the
            // subscriber already had there is dropped, as a client does.
            let had = |e: &Event| matches!(e, Event::Message { id: i, .. } if *i == id);
            if gap && s.events.iter().any(had) {
                s.resent += 1;
                continue;
            }
            s.events.push(Event::Message { seq, id });
            newest = newest.max(Some(seq));
        }
    }
}

/// What the clients of one run saw.
#[derive(Debug, Default)]
pub struct Tally {
    /// Publishes answered 200.
    pub published: usize,
    /// Messages received, each once per subscriber.
    pub delivered: usize,
    /// Published, never received, and no gap announced in between.
    pub lost: usize,
    /// Messages a subscriber received again.
    pub duplicates: usize,
    /// Messages received after one published after them (not counting
    /// duplicates): a lower id than one received before, or a lower
    /// sequence number than a message received before, both publishes
    /// answered 200 (one publish at a time per channel: the second was sent
    /// once the first was stored).
    pub reordered: usize,
    /// Messages received although their publish was not answered 200 (a
    /// publish that timed out can still be stored).
    pub unconfirmed: usize,
    /// Answers with `"gap": true`.
    pub gaps: usize,
    pub subscribers: usize,
    /// Subscribers that saw at least one gap.
    pub subscribers_with_gap: usize,
    /// Gaps seen before [`Traffic::fault`].
    pub gaps_before_fault: usize,
    /// Subscribers that saw more than one gap.
    pub subscribers_with_gaps: usize,
    /// Polls refused, failed or unreadable.
    pub subscribe_errors: u64,
    /// Messages received without the publishers' `seq` or a readable id.
    pub unreadable: u64,
    /// Publishes not answered 200.
    pub publish_errors: u64,
    /// The first lost messages, by subscriber.
    pub lost_detail: Vec<String>,
    /// The first duplicates and messages out of order, by subscriber.
    pub order_detail: Vec<String>,
}

impl Tally {
    fn add(&mut self, name: &str, seen: &Followed, published: &BTreeSet<u64>) {
        self.subscribe_errors += seen.errors;
        self.unreadable += seen.unreadable;
        let mut received = HashSet::new();
        let mut ids = HashSet::new();
        let mut newest: Option<u64> = None;
        let mut newest_id: Option<Id> = None;
        let mut newest_confirmed: Option<u64> = None;
        let mut gaps = 0;
        let mut odd: Vec<String> = Vec::new();
        // Gaps as (last received before, published below at the time),
        // closed by the first message after them.
        let mut open: Option<(Option<u64>, u64)> = None;
        let mut covered: Vec<(Option<u64>, u64)> = Vec::new();
        for e in &seen.events {
            match *e {
                Event::Gap {
                    published_below,
                    after_fault,
                } => {
                    self.gaps += 1;
                    gaps += 1;
                    if !after_fault {
                        self.gaps_before_fault += 1;
                    }
                    open.get_or_insert((newest, published_below));
                }
                Event::Message { seq, id } => {
                    if let Some((after, below)) = open.take() {
                        covered.push((after, below.min(seq)));
                    }
                    // A duplicate by its sequence number or by its id; both
                    // sets take it (`|`, not `||`).
                    if !received.insert(seq) | !ids.insert(id) {
                        self.duplicates += 1;
                        odd.push(format!("{seq} again"));
                        continue;
                    }
                    let confirmed = published.contains(&seq);
                    if newest_id.is_some_and(|n| id < n)
                        || (confirmed && newest_confirmed.is_some_and(|n| seq < n))
                    {
                        self.reordered += 1;
                        odd.push(format!("{seq} after {newest:?}"));
                    }
                    newest = newest.max(Some(seq));
                    newest_id = newest_id.max(Some(id));
                    if confirmed {
                        newest_confirmed = newest_confirmed.max(Some(seq));
                    }
                }
            }
        }
        covered.extend(open);
        if !covered.is_empty() {
            self.subscribers_with_gap += 1;
        }
        if gaps > 1 {
            self.subscribers_with_gaps += 1;
        }
        if !odd.is_empty() {
            let first: Vec<String> = odd.into_iter().take(12).collect();
            self.order_detail
                .push(format!("{name} received {}", first.join(", ")));
        }
        self.delivered += received.len();
        self.unconfirmed += received.iter().filter(|s| !published.contains(s)).count();
        let lost: Vec<u64> = published
            .iter()
            .copied()
            .filter(|s| !received.contains(s))
            .filter(|s| {
                !covered
                    .iter()
                    .any(|(after, below)| after.is_none_or(|a| *s > a) && s < below)
            })
            .collect();
        if !lost.is_empty() {
            self.lost += lost.len();
            let first: Vec<u64> = lost.iter().take(12).copied().collect();
            self.lost_detail
                .push(format!("{name} lost {} (first: {first:?})", lost.len()));
        }
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "published {}, delivered {}, lost {}, duplicates {}, reordered {}, \
             unconfirmed {}, gaps {} (seen by {} of {} subscribers, {} before \
             the fault, {} subscribers with more than one), \
             unreadable {}, client-visible errors: {} polls, {} publishes",
            self.published,
            self.delivered,
            self.lost,
            self.duplicates,
            self.reordered,
            self.unconfirmed,
            self.gaps,
            self.subscribers_with_gap,
            self.subscribers,
            self.gaps_before_fault,
            self.subscribers_with_gaps,
            self.unreadable,
            self.subscribe_errors,
            self.publish_errors
        )?;
        for d in self.lost_detail.iter().chain(&self.order_detail) {
            write!(f, "\n  {d}")?;
        }
        Ok(())
    }
}

impl Tally {
    /// Asserts that the clients saw exactly what was published: something
    /// was published and delivered; nothing lost (beyond the gaps
    /// announced), received twice or out of order; and `gap: true` exactly
    /// as `gaps` says.
    pub fn assert_exact(&self, gaps: Gaps) {
        assert!(self.published > 0 && self.delivered > 0, "{self}");
        assert_eq!(self.lost, 0, "lost: {self}");
        assert_eq!(self.duplicates, 0, "duplicates: {self}");
        assert_eq!(self.reordered, 0, "out of order: {self}");
        assert_eq!(self.unreadable, 0, "messages not of this traffic: {self}");
        match gaps {
            Gaps::None => assert_eq!(self.gaps, 0, "a gap where none was: {self}"),
            Gaps::OncePerSubscriberAfterFault => {
                assert_eq!(
                    self.subscribers_with_gap, self.subscribers,
                    "every subscriber must be told: {self}"
                );
                assert_eq!(self.gaps_before_fault, 0, "a gap before the fault: {self}");
                assert_eq!(self.gaps, self.subscribers, "one gap each: {self}");
            }
            Gaps::AfterFault => {
                assert_eq!(self.gaps_before_fault, 0, "a gap before the fault: {self}");
            }
        }
    }
}
