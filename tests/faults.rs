//! The fault suite: three pollgate instances on one real redis-server,
//! numbered messages published without pause through the publish API, and
//! on every instance a subscriber per channel following it with cursors;
//! then Redis or an instance fails. Each scenario prints what the clients
//! saw (`cargo test --test faults -- --nocapture`) and checks that each
//! subscriber received every message answered 200 by a publish (but for
//! those a gap announced to it covers), none twice, in the order they were
//! published, and `gap: true` only where the scenario loses history.
//! Scenarios (f) run the same traffic on two instances behind Sentinel
//! (tests/support/sentinel.rs). The harness is
//! tests/support/{fleet,traffic,proxy,sentinel}.rs; what is covered and how
//! to run it is in docs/reliability.md.

mod support;

use std::time::{Duration, Instant};
use support::fleet::Fleet;
use support::proxy::Proxy;
use support::redis::{RedisCluster, RedisServer};
use support::sentinel::SentinelRedis;
use support::traffic::{Gaps, Traffic, CHANNELS, INTERVAL};
use support::{get_json, Pollgate};

const INSTANCES: usize = 3;
/// How long Redis stays down.
const OUTAGE: Duration = Duration::from_secs(1);

/// A fleet of [`INSTANCES`] on `redis`, with traffic flowing.
async fn busy_fleet(redis: RedisServer) -> (Fleet, Traffic) {
    let fleet = Fleet::start(redis, INSTANCES);
    let traffic = Traffic::start(&fleet.directory);
    traffic.flowing().await;
    (fleet, traffic)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_killed_and_restarted_with_its_data_loses_nothing() {
    let (mut fleet, traffic) = busy_fleet(RedisServer::start_persistent()).await;

    traffic.fault();
    fleet.redis_outage(OUTAGE).await;
    traffic.flowing().await;

    let tally = traffic
        .finish("(a) Redis SIGKILLed and restarted with its data")
        .await;
    tally.assert_exact(Gaps::None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_redis_restarted_empty_tells_every_subscriber_gap() {
    let (mut fleet, traffic) = busy_fleet(RedisServer::start()).await;

    traffic.fault();
    fleet.redis_outage(OUTAGE).await;
    traffic.flowing().await;

    let tally = traffic
        .finish("(b) Redis SIGKILLed and restarted empty")
        .await;
    tally.assert_exact(Gaps::OncePerSubscriberAfterFault);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_an_instance_killed_loses_nothing_for_subscribers_moving_with_their_cursors() {
    let (mut fleet, traffic) = busy_fleet(RedisServer::start()).await;

    traffic.fault();
    fleet.kill(1).await;
    traffic.flowing().await;

    let tally = traffic
        .finish("(c) one instance SIGKILLed, its subscribers moved on")
        .await;
    assert!(tally.subscribe_errors > 0, "the move was seen: {tally}");
    tally.assert_exact(Gaps::None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_every_instance_restarted_in_turn_with_sigterm_loses_nothing() {
    let (mut fleet, traffic) = busy_fleet(RedisServer::start()).await;

    traffic.fault();
    for i in 0..INSTANCES {
        fleet.restart(i).await;
        traffic.flowing().await;
    }

    let tally = traffic
        .finish("(d) every instance restarted in turn with SIGTERM")
        .await;
    tally.assert_exact(Gaps::None);
}

/// Instance 0 reaches Redis through a proxy that cuts its connection for a
/// second (instances 1 and 2 keep publishing meanwhile), then stalls the
/// new connection for 6.5 s at its first script call: pollgate's response
/// timeout is 2 s, so the catch-up reads of the missed messages (one
/// channel after the other) all fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_a_failed_catch_up_read_after_a_reconnect_loses_nothing() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port);
    let direct = redis.url();
    let fleet = Fleet::start_via(redis, vec![proxy.redis_url(), direct.clone(), direct]);
    let traffic = Traffic::start(&fleet.directory);
    traffic.flowing().await;

    proxy.stall_next_connection_at(b"EVALSHA", Duration::from_millis(6500));
    every_poll_just_held_again(fleet.instance(0), CHANNELS).await;
    traffic.fault();
    proxy.cut(OUTAGE);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proxy.stall_fired() {
        assert!(Instant::now() < deadline, "instance 0 never reconnected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(7)).await;
    fleet.wait_ready().await;
    traffic.flowing().await;

    let tally = traffic
        .finish("(e) instance 0's Redis connection cut, then its catch-up read stalled")
        .await;
    tally.assert_exact(Gaps::None);
}

/// Runs `fault` (blocking) while `traffic` flows; prints how long it took
/// and when publishing worked again (counted from the fault's start).
async fn fail_over(traffic: &Traffic, what: &str, fault: impl FnOnce()) {
    let started = Instant::now();
    traffic.fault();
    tokio::task::block_in_place(fault);
    println!("failed over in {:?}", started.elapsed());
    traffic.flowing().await;
    println!(
        "publishing works again {:?} after {what}",
        started.elapsed()
    );
}

/// Two instances behind Sentinel, publishing with `publish.replicas: 1`,
/// with traffic flowing.
async fn sentinel_fleet() -> (SentinelRedis, Fleet, Traffic) {
    sentinel_fleet_with(SentinelRedis::start, "publish:\n  replicas: 1\n").await
}

/// Two instances (with `extra` YAML) behind the Sentinel-watched Redis that
/// `start` starts, with traffic flowing.
async fn sentinel_fleet_with(
    start: fn() -> SentinelRedis,
    extra: &str,
) -> (SentinelRedis, Fleet, Traffic) {
    let redis = tokio::task::block_in_place(start);
    let urls = vec![redis.url(); 2];
    let fleet = Fleet::start_on(&urls, extra);
    let traffic = Traffic::start(&fleet.directory);
    traffic.flowing().await;
    (redis, fleet, traffic)
}

/// The master SIGKILLed: the sentinels promote the replica, the instances
/// follow, and every publish answered 200 (its message on the replica,
/// `WAIT 1`) is delivered. The killed server comes back empty and becomes
/// the new master's replica, after which publishes are acknowledged again.
/// A message stored and announced on the old master but not replicated
/// (its publish not answered 200) may reach some subscribers before the
/// kill: those are told `gap: true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_sentinel_master_killed_loses_no_acknowledged_publish() {
    let (mut redis, fleet, traffic) = sentinel_fleet().await;

    fail_over(&traffic, "the kill", || redis.kill_master()).await;

    let tally = traffic
        .finish("(f) Sentinel: the master SIGKILLed, publish.replicas: 1")
        .await;
    drop(fleet);
    tally.assert_exact(Gaps::AfterFault);
}

/// Without `publish.replicas`, a failover loses what the replica had not
/// received: the replica's link passes nothing for 0.8 s while publishes
/// are acknowledged, then the master is SIGKILLed. Every subscriber is told
/// `gap: true` for the writes lost (lost = 0 counts them as announced),
/// nothing is delivered twice or out of order; and a subscriber away
/// during the fault, coming back with a cursor from before the loss, is
/// told too (a loss notice in the channel's history).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_sentinel_master_killed_without_replicas_announces_every_lost_write() {
    let (mut redis, fleet, traffic) =
        sentinel_fleet_with(SentinelRedis::start_with_replica_link, "").await;
    let here = fleet.instance(1).url("/sub/fault0?timeout=0");
    let (_, _, v) = get_json(&here).await;
    let away = v["cursor"].as_str().unwrap().to_string();

    fail_over(&traffic, "the kill", || {
        redis.kill_master_with_replica_behind(Duration::from_millis(800))
    })
    .await;

    let tally = traffic
        .finish("(f) Sentinel: the replica behind, the master SIGKILLed, publish.replicas: 0")
        .await;
    let back = fleet
        .instance(0)
        .url(&format!("/sub/fault0?cursor={away}&timeout=0"));
    let (status, _, v) = get_json(&back).await;
    // Seen from outside: the failover counted, the master in use named.
    let master = format!("(master 127.0.0.1:{})", redis.master_port());
    for i in 0..2 {
        let pg = fleet.instance(i);
        assert!(pg.metric("pollgate_broker_failovers_total").await >= 1.0);
        let (_, _, ready) = get_json(&pg.admin("/readyz")).await;
        let address = ready["broker_address"].as_str().unwrap_or_default();
        assert!(address.ends_with(&master), "{ready}");
    }
    drop(fleet);
    tally.assert_exact(Gaps::AfterFault);
    assert!(
        tally.gaps > 0,
        "writes were lost, so gaps are told: {tally}"
    );
    assert_eq!((status, v["gap"].as_bool()), (200, Some(true)), "{v}");
}

/// `SENTINEL FAILOVER`: the replica is promoted, the old master demoted
/// (the sentinels close its clients); the instances follow. Publishes
/// the old master took after the promotion cannot be replicated, so they
/// are answered 503 not_replicated; subscribers that received one are
/// told `gap: true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_sentinel_failover_loses_no_acknowledged_publish() {
    let (redis, fleet, traffic) = sentinel_fleet().await;

    fail_over(&traffic, "SENTINEL FAILOVER", || redis.failover()).await;

    let tally = traffic
        .finish("(f) Sentinel: SENTINEL FAILOVER, publish.replicas: 1")
        .await;
    drop(fleet);
    tally.assert_exact(Gaps::AfterFault);
}

/// Two instances on a Redis Cluster of three masters with a replica each
/// (`redis+cluster://` with all six nodes), publishing with
/// `publish.replicas: 1`, with traffic flowing; and the slot of channel
/// `fault0` (`pollgate:{fault0}:h`).
async fn cluster_fleet() -> (RedisCluster, Fleet, Traffic, u16) {
    let redis = tokio::task::block_in_place(RedisCluster::start_with_replicas);
    let slot = redis.keyslot("pollgate:{fault0}:h");
    let urls = vec![redis.url(); 2];
    let fleet = Fleet::start_on(&urls, "publish:\n  replicas: 1\n");
    let traffic = Traffic::start(&fleet.directory);
    traffic.flowing().await;
    (redis, fleet, traffic, slot)
}

/// The master of a busy channel's slot SIGKILLed: its replica takes the
/// slot over (`cluster-node-timeout` 1 s), the instances follow, and
/// every publish answered 200 (on the replica too, `WAIT 1`) is
/// delivered. The killed node comes back empty as the new master's
/// replica, after which publishes of that slot are acknowledged again.
/// The restarted node claims its old slots until it learns of the
/// failover: the instances must not keep a shard subscription there
/// (`src/broker/redis/cluster.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_cluster_master_killed_loses_no_acknowledged_publish() {
    let (mut redis, fleet, traffic, slot) = cluster_fleet().await;

    let started = Instant::now();
    traffic.fault();
    let failed_over = tokio::task::block_in_place(|| redis.kill_owner(slot));
    println!(
        "slot {slot} failed over in {failed_over:?}, replica back after {:?}",
        started.elapsed()
    );
    traffic.flowing().await;
    println!(
        "publishing works again {:?} after the kill",
        started.elapsed()
    );

    let names = [
        "pollgate:{fault0}",
        "pollgate:{fault1}",
        "pollgate:{fault2}",
    ];
    println!("{}", redis.describe(&names));
    let tally = traffic
        .finish("(g) Cluster: a slot's master SIGKILLed, publish.replicas: 1")
        .await;
    drop(fleet);
    tally.assert_exact(Gaps::AfterFault);
}

/// A busy channel's slot migrated to another master while polls are held
/// and publishes flow (IMPORTING, MIGRATING, `MIGRATE` of its keys,
/// `SETSLOT NODE`): nothing is lost, nothing comes twice or out of order,
/// and no gap is announced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_cluster_slot_migrated_loses_nothing() {
    let (redis, fleet, traffic, slot) = cluster_fleet().await;

    let started = Instant::now();
    traffic.fault();
    tokio::task::block_in_place(|| redis.migrate(slot));
    println!("slot {slot} migrated in {:?}", started.elapsed());
    traffic.flowing().await;
    println!(
        "{} more publishes per channel {:?} after the migration began",
        25,
        started.elapsed()
    );

    let names = [
        "pollgate:{fault0}",
        "pollgate:{fault1}",
        "pollgate:{fault2}",
    ];
    println!("{}", redis.describe(&names));
    let tally = traffic
        .finish("(h) Cluster: a busy slot migrated to another master")
        .await;
    drop(fleet);
    tally.assert_exact(Gaps::None);
}

/// Returns between two rounds of publishes, once the `n` polls held on `pg`
/// were answered and all held again: a fault now finds every subscriber of
/// `pg` waiting there.
async fn every_poll_just_held_again(pg: &Pollgate, n: usize) {
    let held = || pg.metric("pollgate_held_requests");
    let deadline = Instant::now() + Duration::from_secs(10);
    while held().await >= n as f64 {
        assert!(
            Instant::now() < deadline,
            "no publish reached {n} held polls"
        );
    }
    while held().await < n as f64 {
        assert!(Instant::now() < deadline, "the polls were not held again");
    }
    // The round's other channels were answered too; the next round is ~20 ms off.
    tokio::time::sleep(INTERVAL / 2).await;
}
