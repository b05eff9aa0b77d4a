//! Redis behind Sentinel (`redis+sentinel://`, `rediss+sentinel://`): which
//! sentinels to ask, for which master, and how to reach it; the master's
//! address asked of the sentinels on every connection (its role checked
//! again on the connection itself, so a replica is never written to); and
//! the watch of the sentinels' `+switch-master` announcements, which makes
//! the broker reconnect at once when a failover names a new master.

use crate::broker::UrlError;
use futures_util::StreamExt;
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{
    ConnectionAddr, ConnectionInfo, IntoConnectionInfo, ProtocolVersion, RedisConnectionInfo,
    RedisResult, TlsMode,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Longest time to ask the sentinels and check the master's role.
const ASK_TIMEOUT: Duration = Duration::from_secs(4);
/// Pause before the watch tries the next sentinel.
const WATCH_RETRY: Duration = Duration::from_millis(500);

/// The sentinels of one master, and how to reach that master.
#[derive(Clone)]
pub struct SentinelTarget {
    sentinels: Vec<ConnectionInfo>,
    master_name: String,
    node: SentinelNodeConnectionInfo,
    /// The master last confirmed (`host:port`), shared by the clones.
    current: Arc<parking_lot::Mutex<Option<String>>>,
}

impl SentinelTarget {
    /// Parses `[[user]:password@]s1:26379,s2:26379/<master-name>[/<db>]`,
    /// the part after `redis+sentinel://` (TLS to sentinels and master when
    /// `tls`); the sentinels' own password is `sentinel_password` (empty:
    /// none). The error says what is wrong, without the password.
    pub fn parse(
        rest: &str,
        tls: bool,
        sentinel_password: &str,
    ) -> Result<SentinelTarget, UrlError> {
        let bad = |why: &str| UrlError(format!("redis+sentinel://{why}"));
        let (auth, tail) = match rest.rsplit_once('@') {
            Some((a, t)) => (Some(a), t),
            None => (None, rest),
        };
        let (hosts, path) = tail.split_once('/').unwrap_or((tail, ""));
        let mut parts = path.split('/').filter(|p| !p.is_empty());
        let master_name = parts
            .next()
            .ok_or_else(|| {
                bad(" needs the master's name: redis+sentinel://s1:26379,s2:26379/mymaster")
            })?
            .to_string();
        let db = match parts.next() {
            Some(db) => db
                .parse::<i64>()
                .map_err(|_| bad(&format!(": database '{db}' is not a number")))?,
            None => 0,
        };
        if parts.next().is_some() {
            return Err(bad(": expected /<master-name>[/<db>] after the hosts"));
        }
        let (username, password) = match auth {
            Some(a) => {
                let (u, p) = a.split_once(':').unwrap_or(("", a));
                let decode = |s: &str| {
                    percent_encoding::percent_decode_str(s)
                        .decode_utf8_lossy()
                        .into_owned()
                };
                (
                    (!u.is_empty()).then(|| decode(u)),
                    (!p.is_empty()).then(|| decode(p)),
                )
            }
            None => (None, None),
        };
        let scheme = if tls { "rediss" } else { "redis" };
        let mut sentinels = Vec::new();
        for host in hosts.split(',').filter(|h| !h.is_empty()) {
            let mut info = format!("{scheme}://{host}")
                .as_str()
                .into_connection_info()
                .map_err(|e| bad(&format!(": sentinel '{host}': {e}")))?;
            if !sentinel_password.is_empty() {
                info.redis.password = Some(sentinel_password.to_string());
            }
            sentinels.push(info);
        }
        if sentinels.is_empty() {
            return Err(bad(" needs at least one sentinel host:port"));
        }
        let node = SentinelNodeConnectionInfo {
            tls_mode: tls.then_some(TlsMode::Secure),
            redis_connection_info: Some(RedisConnectionInfo {
                db,
                username,
                password,
                protocol: ProtocolVersion::RESP3,
            }),
        };
        Ok(SentinelTarget {
            sentinels,
            master_name,
            node,
            current: Arc::default(),
        })
    }

    /// The master's name, as the sentinels know it.
    pub fn master_name(&self) -> &str {
        &self.master_name
    }

    /// Notes that `addr` was confirmed master. Returns the master confirmed
    /// before it when that was another one: a failover was followed.
    pub fn confirmed(&self, addr: &str) -> Option<String> {
        let mut current = self.current.lock();
        let before = current.replace(addr.to_string());
        before.filter(|b| b != addr)
    }

    /// The master last confirmed (`host:port`), if any.
    pub fn current(&self) -> Option<String> {
        self.current.lock().clone()
    }

    /// Asks the sentinels (each in turn) for the master and returns a
    /// client for it, after the master confirmed its role with `ROLE`.
    pub async fn master(&self) -> RedisResult<redis::Client> {
        let ask = async {
            let mut sentinel = Sentinel::build(self.sentinels.clone())?;
            sentinel
                .async_master_for(&self.master_name, Some(&self.node))
                .await
        };
        match tokio::time::timeout(ASK_TIMEOUT, ask).await {
            Ok(result) => result,
            Err(_) => Err(timed_out("the sentinels did not name a master in time")),
        }
    }

    /// Watches the sentinels' `+switch-master` announcements of this
    /// master, one sentinel at a time (the next when one fails), and
    /// wakes `switched` for each. Runs until dropped.
    pub async fn watch(self, switched: Arc<Notify>) {
        for i in 0.. {
            let info = &self.sentinels[i % self.sentinels.len()];
            if let Err(e) = self.watch_one(info, &switched).await {
                tracing::debug!(sentinel = %address(&info.addr), error = %e, "sentinel watch ended");
            }
            tokio::time::sleep(WATCH_RETRY).await;
        }
    }

    async fn watch_one(&self, info: &ConnectionInfo, switched: &Notify) -> RedisResult<()> {
        let client = redis::Client::open(info.clone())?;
        let mut pubsub = tokio::time::timeout(ASK_TIMEOUT, client.get_async_pubsub())
            .await
            .map_err(|_| timed_out("sentinel connection timed out"))??;
        pubsub.subscribe("+switch-master").await?;
        let mut messages = pubsub.on_message();
        while let Some(m) = messages.next().await {
            // "<master-name> <old-ip> <old-port> <new-ip> <new-port>"
            let payload: String = m.get_payload().unwrap_or_default();
            let mut words = payload.split(' ');
            if words.next() == Some(self.master_name.as_str()) {
                tracing::warn!(switch = %payload, "the sentinels announce a new master");
                switched.notify_one();
            }
        }
        Ok(())
    }
}

/// `host:port` of an address, for logs (no secret in it).
pub fn address(addr: &ConnectionAddr) -> String {
    addr.to_string()
}

fn timed_out(what: &'static str) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::IoError, what))
}

/// Whether the server behind `conn` says it is a master (`ROLE`).
pub async fn is_master(conn: &mut redis::aio::MultiplexedConnection) -> RedisResult<bool> {
    let role: redis::Value = redis::cmd("ROLE").query_async(conn).await?;
    Ok(match role {
        redis::Value::Array(items) => {
            matches!(
                items.first(),
                Some(redis::Value::BulkString(b)) if b == b"master"
            ) || matches!(items.first(), Some(redis::Value::SimpleString(s)) if s == "master")
        }
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_sentinels_master_and_db() {
        let t = SentinelTarget::parse("u:p%40w@s1:26379,s2:26380/mymaster/3", false, "sp").unwrap();
        assert_eq!(t.master_name(), "mymaster");
        assert_eq!(t.sentinels.len(), 2);
        assert_eq!(address(&t.sentinels[1].addr), "s2:26380");
        assert_eq!(t.sentinels[0].redis.password.as_deref(), Some("sp"));
        let node = t.node.redis_connection_info.as_ref().unwrap();
        assert_eq!((node.db, node.username.as_deref()), (3, Some("u")));
        assert_eq!(node.password.as_deref(), Some("p@w"));
        assert!(SentinelTarget::parse("s1:26379", false, "").is_err());
        assert!(SentinelTarget::parse("s1:26379/m/x", false, "").is_err());
        assert!(SentinelTarget::parse("/m", false, "").is_err());
        let tls = SentinelTarget::parse(":pw@s1:26379/m", true, "").unwrap();
        assert!(matches!(
            tls.sentinels[0].addr,
            ConnectionAddr::TcpTls { .. }
        ));
        assert!(matches!(tls.node.tls_mode, Some(TlsMode::Secure)));
    }
}
