//! Fairness per client: who the client of a request is (the peer, or the
//! address a trusted proxy names in `X-Forwarded-For`), and the two bounds
//! on one client, `limits.max_held_per_client` (requests held at once:
//! polls, SSE streams, watch requests) and `limits.polls_per_client` (new
//! held requests per second, a token bucket). Over either: `429`.
//!
//! With both limits 0 (the default) [`Clients::enabled`] is false and the
//! poll path does nothing more than that one check: no address is looked
//! up, nothing hashed, nothing allocated.
//!
//! The state per client is bounded: a client's held count leaves the map
//! when it falls to zero, and the rate limiter forgets a client once its
//! bucket is full again ([`Clients::housekeep`], once a second).

use crate::metrics::Refusal;
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;
use parking_lot::Mutex;
use pingora::protocols::http::ServerSession as Session;
use pingora::protocols::Stream;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;

/// The header a trusted proxy names the client in.
pub const FORWARDED_FOR: &str = "X-Forwarded-For";

/// Seconds a client over `limits.max_held_per_client` is asked to wait
/// (`Retry-After`): its polls end at their timeout or with a message, which
/// is seldom within a second.
pub const HELD_RETRY_AFTER: u64 = 5;

/// The load balancers whose `X-Forwarded-For` names the client
/// (`trusted_proxies`).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

/// One entry of `trusted_proxies`: a CIDR (`10.0.0.0/8`, `2001:db8::/32`)
/// or a single address. Returns None when it is neither.
pub fn parse_cidr(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

impl TrustedProxies {
    /// The trusted networks of `entries` (those that do not parse are
    /// skipped: `Config::validate` refuses them first).
    pub fn new<S: AsRef<str>>(entries: &[S]) -> TrustedProxies {
        TrustedProxies(
            entries
                .iter()
                .filter_map(|e| parse_cidr(e.as_ref()))
                .map(|net| net.trunc())
                .collect(),
        )
    }

    /// Whether no proxy is trusted (then `X-Forwarded-For` is never read).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` is one of the trusted proxies.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client that the `X-Forwarded-For` fields `fields` (in the order
    /// received) name, if the peer is a trusted proxy: walking the entries
    /// from the right, the first address that is not trusted; when every
    /// entry is trusted, the leftmost. A malformed entry stops the walk:
    /// the last trusted hop before it is the client. Returns None when the
    /// peer itself is that client (no entry, or the rightmost malformed).
    pub fn forwarded<'v>(
        &self,
        fields: impl DoubleEndedIterator<Item = &'v [u8]>,
    ) -> Option<IpAddr> {
        let mut last = None;
        for field in fields.rev() {
            for entry in field.rsplit(|&b| b == b',') {
                let entry = entry.trim_ascii();
                if entry.is_empty() {
                    continue; // an empty list element (RFC 9110, 5.6.1)
                }
                let Some(ip) = parse_entry(entry) else {
                    return last;
                };
                if !self.trusts(ip) {
                    return Some(ip);
                }
                last = Some(ip);
            }
        }
        last
    }

    /// The client of a request from `peer`: the peer, unless it is a
    /// trusted proxy; then what `forwarded` returns (see
    /// [`TrustedProxies::forwarded`]), or the peer when that is None.
    pub fn client(&self, peer: IpAddr, forwarded: impl FnOnce() -> Option<IpAddr>) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        forwarded().map_or(peer, |ip| ip.to_canonical())
    }
}

/// One `X-Forwarded-For` entry: an IP address, IPv4 with a port, or IPv6 in
/// brackets with or without a port. None for anything else (`unknown`, an
/// obfuscated identifier, garbage).
fn parse_entry(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?;
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sock) = text.parse::<SocketAddr>() {
        return Some(sock.ip());
    }
    let inner = text.strip_prefix('[')?.strip_suffix(']')?;
    inner.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
}

/// What one client is counted under: its IPv4 address, or the /64 network
/// of its IPv6 address (one host or household commonly holds a whole /64,
/// so counting single IPv6 addresses would bound nobody).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
    }
}

/// The per-client limits of one instance.
pub struct Clients {
    /// Who the client of a request is.
    pub trusted: TrustedProxies,
    /// Most requests held at once per client (0: no limit).
    max_held: usize,
    /// Requests held per client: an entry exists only while its count is
    /// above zero.
    held: Mutex<HashMap<IpAddr, usize, ahash::RandomState>>,
    /// New held requests per second per client (None: no limit).
    rate: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

/// Why a client is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit {
    /// Which limit: `MaxHeldPerClient` or `PollsPerClient`.
    pub refusal: Refusal,
    /// Seconds to wait before trying again (`Retry-After`).
    pub retry_after: u64,
}

/// One request counted against its client's `max_held_per_client`, given
/// back when it drops (or nothing, when no client limit applies).
pub struct ClientSlot<'a>(Option<(&'a Clients, IpAddr)>);

impl ClientSlot<'_> {
    /// A slot that counts nothing (no per-client limit applies).
    pub fn none() -> ClientSlot<'static> {
        ClientSlot(None)
    }
}

impl Clients {
    /// Limits of `max_held` held requests per client (0: none) and
    /// `per_second` new ones per second per client (0: none), the client
    /// found through `trusted`.
    pub fn new(max_held: usize, per_second: u32, trusted: TrustedProxies) -> Clients {
        Clients {
            trusted,
            max_held,
            held: Mutex::new(HashMap::default()),
            rate: NonZeroU32::new(per_second).map(|n| RateLimiter::keyed(Quota::per_second(n))),
        }
    }

    /// Clients without limits.
    pub fn unlimited() -> Clients {
        Clients::new(0, 0, TrustedProxies::default())
    }

    /// Whether either limit is on: when not, nothing else here needs to
    /// be called (and the client's address need not be found).
    #[inline]
    pub fn enabled(&self) -> bool {
        self.max_held != 0 || self.rate.is_some()
    }

    /// Whether the client of a request may depend on `X-Forwarded-For`
    /// (a limit is on, and some proxy is trusted).
    pub fn reads_forwarded(&self) -> bool {
        self.enabled() && !self.trusted.is_empty()
    }

    /// Admits one new held request of `client`: takes a token of its rate
    /// and a slot of its held requests. Returns the slot, or the limit the
    /// client is over (the slot is not taken then).
    pub fn admit(&self, client: IpAddr) -> Result<ClientSlot<'_>, OverLimit> {
        let key = client_key(client);
        if let Some(rate) = &self.rate {
            if let Err(not_until) = rate.check_key(&key) {
                let wait = not_until.wait_time_from(rate.clock().now());
                return Err(OverLimit {
                    refusal: Refusal::PollsPerClient,
                    retry_after: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
                });
            }
        }
        if self.max_held == 0 {
            return Ok(ClientSlot(None));
        }
        let mut held = self.held.lock();
        let count = held.entry(key).or_insert(0);
        if *count >= self.max_held {
            // At least 1 (max_held is): the entry was there already.
            return Err(OverLimit {
                refusal: Refusal::MaxHeldPerClient,
                retry_after: HELD_RETRY_AFTER,
            });
        }
        *count += 1;
        Ok(ClientSlot(Some((self, key))))
    }

    /// The client of a request on a Pingora session (HTTP/1 or an HTTP/2
    /// stream): its peer, or whom a trusted peer's `X-Forwarded-For`
    /// names. None when the peer is not an IP address.
    pub fn of_session(&self, session: &Session) -> Option<IpAddr> {
        let peer = session.client_addr()?.as_inet()?.ip();
        Some(self.trusted.client(peer, || {
            let fields = session.req_header().headers.get_all(FORWARDED_FOR);
            self.trusted.forwarded(fields.iter().map(|v| v.as_bytes()))
        }))
    }

    /// The client of a request on a raw connection (`stream`), whose
    /// `X-Forwarded-For` named `forwarded` ([`TrustedProxies::forwarded`]).
    /// None when the peer is not an IP address.
    pub fn of_stream(&self, stream: &Stream, forwarded: Option<IpAddr>) -> Option<IpAddr> {
        let digest = stream.get_socket_digest()?;
        let peer = digest.peer_addr()?.as_inet()?.ip();
        Some(self.trusted.client(peer, || forwarded))
    }

    /// Requests held now by `client` (0 when it holds none).
    pub fn held_by(&self, client: IpAddr) -> usize {
        self.held
            .lock()
            .get(&client_key(client))
            .copied()
            .unwrap_or(0)
    }

    /// Clients remembered: (with requests held, in the rate limiter).
    pub fn remembered(&self) -> (usize, usize) {
        let rate = self.rate.as_ref().map_or(0, |r| r.len());
        (self.held.lock().len(), rate)
    }

    /// Forgets the rate of every client whose bucket is full again, and
    /// gives back the memory of those forgotten (run once a second).
    pub fn housekeep(&self) {
        if let Some(rate) = &self.rate {
            rate.retain_recent();
            rate.shrink_to_fit();
        }
        let mut held = self.held.lock();
        if held.capacity() > 64 && held.capacity() > 4 * held.len() {
            held.shrink_to_fit();
        }
    }
}

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        if let Some((clients, key)) = self.0 {
            let mut held = clients.held.lock();
            if let Some(count) = held.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    held.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn fields<'a>(f: &'a [&'a str]) -> impl DoubleEndedIterator<Item = &'a [u8]> {
        f.iter().map(|s| s.as_bytes())
    }

    #[test]
    fn cidrs_and_single_addresses_are_trusted() {
        assert!(parse_cidr("10.0.0.0/8").is_some());
        assert!(parse_cidr("2001:db8::/32").is_some());
        assert!(parse_cidr("192.0.2.7").is_some());
        assert!(parse_cidr("::1").is_some());
        for bad in ["10.0.0.0/33", "10.0.0", "lb.internal", "", "2001:db8::/129"] {
            assert!(parse_cidr(bad).is_none(), "{bad}");
        }
        let t = TrustedProxies::new(&["10.1.2.3/8", "2001:db8::/32", "192.0.2.7"]);
        assert!(t.trusts(ip("10.200.0.1")));
        assert!(t.trusts(ip("::ffff:10.0.0.1")), "IPv4-mapped");
        assert!(t.trusts(ip("2001:db8:1::5")));
        assert!(t.trusts(ip("192.0.2.7")));
        assert!(!t.trusts(ip("192.0.2.8")));
        assert!(!t.trusts(ip("11.0.0.1")));
    }

    #[test]
    fn the_client_is_the_nearest_untrusted_hop() {
        let t = TrustedProxies::new(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.1");
        let client = |f: &[&str]| t.client(peer, || t.forwarded(fields(f)));
        // An untrusted peer: XFF is not even read.
        let outsider = t.client(ip("203.0.113.9"), || panic!("read XFF"));
        assert_eq!(outsider, ip("203.0.113.9"));
        assert_eq!(client(&[]), peer);
        assert_eq!(client(&["198.51.100.1"]), ip("198.51.100.1"));
        // The client may prepend anything; the proxy's own entry wins.
        assert_eq!(client(&["1.1.1.1, 198.51.100.1"]), ip("198.51.100.1"));
        assert_eq!(
            client(&["1.1.1.1", "198.51.100.1, 10.0.0.7"]),
            ip("198.51.100.1"),
            "every field, in order, trusted hops skipped"
        );
        assert_eq!(client(&["10.0.0.9, 10.0.0.8"]), ip("10.0.0.9"), "leftmost");
        // Malformed: the last trusted hop (or the peer).
        assert_eq!(client(&["198.51.100.1, garbage"]), peer);
        assert_eq!(client(&["198.51.100.1, unknown, 10.0.0.8"]), ip("10.0.0.8"));
        assert_eq!(client(&["198.51.100.1,, 10.0.0.8 ,"]), ip("198.51.100.1"));
        // Ports and brackets.
        assert_eq!(client(&["198.51.100.1:4711"]), ip("198.51.100.1"));
        assert_eq!(client(&["[2001:db8::1]:443"]), ip("2001:db8::1"));
        assert_eq!(client(&["[2001:db8::1]"]), ip("2001:db8::1"));
        assert_eq!(client(&["2001:db8::1"]), ip("2001:db8::1"));
        assert_eq!(client(&["::ffff:198.51.100.1"]), ip("198.51.100.1"));
        assert_eq!(client(&["\u{ff}"]), peer);
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        assert_eq!(client_key(ip("2001:db8:0:1::5")), ip("2001:db8:0:1::"));
        assert_eq!(
            client_key(ip("2001:db8:0:1:ffff::9")),
            client_key(ip("2001:db8:0:1::5"))
        );
        assert_ne!(client_key(ip("2001:db8:0:2::5")), ip("2001:db8:0:1::"));
        assert_eq!(client_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    }

    #[test]
    fn held_slots_per_client_are_exact_and_forgotten_at_zero() {
        let c = Clients::new(2, 0, TrustedProxies::default());
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        let one = c.admit(a).unwrap();
        let two = c.admit(a).unwrap();
        let over = c.admit(a).err().unwrap();
        assert_eq!(over.refusal, Refusal::MaxHeldPerClient);
        assert_eq!(over.retry_after, HELD_RETRY_AFTER);
        let other = c.admit(b).unwrap();
        assert_eq!((c.held_by(a), c.held_by(b)), (2, 1));
        drop(one);
        let three = c.admit(a).unwrap();
        drop((two, three, other));
        assert_eq!(c.remembered(), (0, 0), "no entry left behind");
    }

    #[test]
    fn the_rate_is_a_bucket_per_client_and_forgotten_when_full() {
        let c = Clients::new(0, 3, TrustedProxies::default());
        assert!(c.enabled());
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            drop(c.admit(a).unwrap());
        }
        let over = c.admit(a).err().unwrap();
        assert_eq!(over.refusal, Refusal::PollsPerClient);
        assert_eq!(over.retry_after, 1);
        assert!(c.admit(ip("192.0.2.2")).is_ok());
        assert_eq!(c.remembered().1, 2);
        // Full again after a second, forgotten one emission interval (1/3 s) later.
        std::thread::sleep(std::time::Duration::from_millis(1500));
        c.housekeep();
        assert_eq!(c.remembered(), (0, 0));
        assert!(c.admit(a).is_ok());
    }

    #[test]
    fn no_limit_no_work() {
        let c = Clients::unlimited();
        assert!(!c.enabled() && !c.reads_forwarded());
        let t = Clients::new(0, 0, TrustedProxies::new(&["10.0.0.0/8"]));
        assert!(!t.reads_forwarded());
    }
}
