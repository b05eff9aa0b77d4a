//! The catch-up after a reconnect ([`RedisBroker::catch_up`]): every
//! watched channel's history read again (64 reads in flight on the one
//! connection) and handed to the hub, so that what was published while
//! the connection was down is delivered; and the loss notice
//! ([`RedisBroker::read_noting_losses`]) for writes a failover lost, which
//! the cluster's moved subscriptions (`cluster.rs`) use too.

use super::conn::Conn;
use super::RedisBroker;
use crate::broker::BrokerError;
use crate::history::History;
use crate::metrics;
use futures_util::StreamExt;
use std::collections::HashSet;

/// Catch-up reads in flight at once after a reconnect.
const CATCH_UP_READS: usize = 64;

impl RedisBroker {
    /// Delivers what was published while the connection was down. A read
    /// that fails is an error: the caller reconnects and tries again, so a
    /// window never jumps past messages it missed. On the same dataset
    /// (`same_dataset`: the epoch did not change), lost writes are
    /// announced ([`RedisBroker::read_noting_losses`]).
    pub(super) async fn catch_up(
        &self,
        conn: &mut Conn,
        watched: &HashSet<String>,
        same_dataset: bool,
    ) -> Result<(), BrokerError> {
        let Some(sink) = self.sink.get() else {
            return Ok(());
        };
        // Pipelined: up to CATCH_UP_READS reads in flight on the one
        // connection, so that a thousand channels take a few round trips.
        let sharded = conn.sharded();
        let reads: Vec<_> = watched
            .iter()
            .map(|channel| self.catch_up_read(conn.clone(), channel, sharded, same_dataset))
            .collect();
        let mut reads = futures_util::stream::iter(reads).buffer_unordered(CATCH_UP_READS);
        while let Some((channel, read)) = reads.next().await {
            let h = read.map_err(|e| {
                tracing::warn!(%channel, error = %e, "catch-up failed; reconnecting");
                self.failed(e)
            })?;
            sink.resync(channel, h).await;
        }
        Ok(())
    }

    /// One read of [`RedisBroker::catch_up`], on its own handle of `conn`.
    async fn catch_up_read<'a>(
        &self,
        mut conn: Conn,
        channel: &'a String,
        sharded: bool,
        same_dataset: bool,
    ) -> (&'a String, redis::RedisResult<History>) {
        let read = self
            .read_noting_losses(&mut conn, channel, sharded, same_dataset)
            .await;
        (channel, read)
    }

    /// Reads `channel`'s history on `conn` for a catch-up. A channel whose
    /// newest position here is missing from it, on the same dataset
    /// (`same_dataset`), lost writes in a failover (replication is
    /// asynchronous): a loss notice is appended first ([`Layout::mark_lost`],
    /// announced with SPUBLISH when `sharded`), so that every cursor from
    /// before it, here and on every instance, is told `gap: true` rather
    /// than nothing.
    pub(super) async fn read_noting_losses(
        &self,
        conn: &mut Conn,
        channel: &str,
        sharded: bool,
        same_dataset: bool,
    ) -> redis::RedisResult<History> {
        let h = self.layout.read(conn, channel).await?;
        let lost = self
            .sink
            .get()
            .and_then(|sink| sink.position(channel))
            .filter(|&p| same_dataset && p > h.floor() && !h.contains(p));
        let Some(lost) = lost else {
            return Ok(h);
        };
        if self.layout.mark_lost(conn, channel, lost, sharded).await? {
            metrics::LOSS_NOTICES.inc();
            tracing::warn!(%channel, %lost, "redis lost writes in a failover (the new master lacks a message this instance had seen): a loss notice tells every cursor from before it gap: true");
        }
        self.layout.read(conn, channel).await
    }
}
