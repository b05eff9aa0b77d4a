//! Fleet-wide occupancy on Redis: each instance writes its subscriber
//! count of each channel into the channel's hash (`NS:{C}:occ`, a field per
//! instance) and renews its heartbeat (`NS:instance:<id>`) every second;
//! the fleet's count of a channel is this instance's own, as it is now, and
//! the fields of the other instances whose heartbeat is there. An instance that dies stops renewing it: its counts
//! stop counting within [`HEARTBEAT_TTL`], and its fields expire with the
//! hash.

use super::conn::Conn;
use super::layout::{HEARTBEAT_TTL, OCCUPANCY_TTL};
use super::{unavailable, RedisBroker};
use crate::broker::BrokerError;
use std::collections::HashMap;
use std::sync::Arc;

impl RedisBroker {
    /// Renews this instance's heartbeat (for [`HEARTBEAT_TTL`]).
    pub(super) async fn beat(&self, conn: &mut Conn) -> redis::RedisResult<()> {
        redis::cmd("SET")
            .arg(self.layout.instance_key(&self.instance))
            .arg(1)
            .arg("PX")
            .arg(HEARTBEAT_TTL.as_millis() as u64)
            .query_async(conn)
            .await
    }

    /// Whether instance `id`'s heartbeat is there (it is alive).
    pub(super) async fn alive(&self, conn: &mut Conn, id: &str) -> redis::RedisResult<bool> {
        redis::cmd("EXISTS")
            .arg(self.layout.instance_key(id))
            .query_async(conn)
            .await
    }

    /// Renews this instance's heartbeat and writes `counts` (a 0 removes
    /// the instance's field).
    pub(super) async fn report(&self, counts: &[(Arc<str>, usize)]) -> Result<(), BrokerError> {
        let conn = self.connection()?;
        let heartbeat = async { self.beat(&mut conn.clone()).await };
        let writes = counts.iter().map(|(channel, n)| {
            let mut c = conn.clone();
            let key = self.layout.occupancy_key(channel);
            let (id, n) = (self.instance.clone(), *n);
            async move {
                if n == 0 {
                    return redis::cmd("HDEL")
                        .arg(&key)
                        .arg(&id)
                        .query_async::<()>(&mut c)
                        .await;
                }
                // One slot per key: a pipeline, also on a cluster.
                redis::pipe()
                    .cmd("HSET")
                    .arg(&key)
                    .arg(&id)
                    .arg(n)
                    .ignore()
                    .cmd("PEXPIRE")
                    .arg(&key)
                    .arg(OCCUPANCY_TTL.as_millis() as u64)
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
            }
        });
        let (beat, written) = tokio::join!(heartbeat, futures_util::future::join_all(writes));
        beat.map_err(unavailable)?;
        written
            .into_iter()
            .collect::<Result<Vec<()>, _>>()
            .map_err(unavailable)?;
        Ok(())
    }

    /// The subscribers of `channel` on the other instances alive.
    pub(super) async fn others(&self, channel: &str) -> Result<usize, BrokerError> {
        let mut conn = self.connection()?;
        let counts: HashMap<String, usize> = redis::cmd("HGETALL")
            .arg(self.layout.occupancy_key(channel))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let others = counts.iter().filter(|(id, _)| **id != self.instance);
        let alive = others.map(|(id, n)| {
            let mut c = conn.clone();
            async move {
                let alive = self.alive(&mut c, id).await?;
                Ok::<usize, redis::RedisError>(if alive { *n } else { 0 })
            }
        });
        let mut total = 0;
        for n in futures_util::future::join_all(alive).await {
            total += n.map_err(unavailable)?;
        }
        Ok(total)
    }
}
