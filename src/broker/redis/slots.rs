//! The slot map of a Redis Cluster as the broker reads it itself
//! (`cluster.rs`): every node's `CLUSTER NODES` view, a slot belonging to
//! the master that claims it with the highest configuration epoch, as
//! Redis itself decides. A node that restarted from an old nodes file
//! claims its former slots with its old epoch until it learns better: the
//! promoted replica's claim, of a higher epoch, wins over it.

use std::collections::HashSet;
use std::sync::Arc;

/// A node's address, `host:port`, as `CLUSTER NODES` names it.
pub type Addr = Arc<str>;

/// A master's claim to slots, as one node's view shows it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Claim {
    epoch: u64,
    addr: Addr,
    ranges: Vec<(u16, u16)>,
}

/// Who serves each slot, from the views of every node that answered.
#[derive(Debug, Default)]
pub struct SlotMap {
    /// Distinct claims, with how many views made each.
    claims: Vec<(Claim, usize)>,
    /// Every node any view names.
    pub nodes: HashSet<Addr>,
}

impl SlotMap {
    /// Adds one node's view: its `CLUSTER NODES` answer, read from `from`.
    pub fn add_view(&mut self, from: &Addr, text: &str) {
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || f[2].contains("noaddr") || f[2].contains("handshake") {
                continue;
            }
            let host_port = f[1].split(['@', ',']).next().unwrap_or_default();
            let addr: Addr = if host_port.starts_with(':') || host_port.is_empty() {
                // A node that does not know its own address yet.
                if !f[2].contains("myself") {
                    continue;
                }
                from.clone()
            } else {
                host_port.into()
            };
            self.nodes.insert(addr.clone());
            if !f[2].split(',').any(|flag| flag == "master") {
                continue;
            }
            let ranges: Vec<(u16, u16)> = f[8..]
                .iter()
                .filter(|r| !r.starts_with('['))
                .filter_map(|r| {
                    let (a, b) = r.split_once('-').unwrap_or((r, r));
                    Some((a.parse().ok()?, b.parse().ok()?))
                })
                .collect();
            if ranges.is_empty() {
                continue;
            }
            let claim = Claim {
                epoch: f[6].parse().unwrap_or(0),
                addr,
                ranges,
            };
            match self.claims.iter_mut().find(|(c, _)| *c == claim) {
                Some((_, views)) => *views += 1,
                None => self.claims.push((claim, 1)),
            }
        }
    }

    /// The master of `slot`: of the claims to it, the one of the highest
    /// configuration epoch (then the one most views make).
    pub fn owner(&self, slot: u16) -> Option<&Addr> {
        self.claims
            .iter()
            .filter(|(c, _)| c.ranges.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .max_by(|(a, va), (b, vb)| (a.epoch, va, &a.addr).cmp(&(b.epoch, vb, &b.addr)))
            .map(|(c, _)| &c.addr)
    }

    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Views after a failover: in its own, the restarted old master
    /// `:7000` still claims its slots with epoch 1; in the others, its
    /// promoted replica `:7003` has them, with epoch 7.
    const STALE: &str = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001 master - 0 1 2 connected 5461-10922
c3 127.0.0.1:7002@17002 master - 0 1 3 connected 10923-16383
d4 127.0.0.1:7003@17003 slave a1 0 1 1 connected
";
    const SETTLED: &str = "\
a1 127.0.0.1:7000@17000 slave d4 0 1 7 connected
b2 127.0.0.1:7001@17001 myself,master - 0 0 2 connected 5461-10922 [5462->-c3]
c3 127.0.0.1:7002@17002 master - 0 1 3 connected 10923-16383
d4 127.0.0.1:7003@17003,host-d master - 0 1 7 connected 0-5460
e5 :0@0 master,noaddr - 0 1 9 disconnected 0-16383
";

    #[test]
    fn the_highest_configuration_epoch_owns_a_slot() {
        let mut map = SlotMap::default();
        map.add_view(&"127.0.0.1:7000".into(), STALE);
        assert_eq!(map.owner(896).map(|a| &**a), Some("127.0.0.1:7000"));
        map.add_view(&"127.0.0.1:7001".into(), SETTLED);
        map.add_view(&"127.0.0.1:7002".into(), SETTLED);
        assert_eq!(map.owner(896).map(|a| &**a), Some("127.0.0.1:7003"));
        assert_eq!(map.owner(5462).map(|a| &**a), Some("127.0.0.1:7001"));
        assert_eq!(map.owner(16383).map(|a| &**a), Some("127.0.0.1:7002"));
        assert_eq!(map.nodes.len(), 4);
        // The same claim from several views is one claim.
        assert_eq!(map.claims.len(), 4);
    }

    #[test]
    fn odd_lines_are_skipped() {
        let mut map = SlotMap::default();
        let me: Addr = "10.0.0.1:6379".into();
        map.add_view(
            &me,
            "x\n\nz1 :6379@16379 myself,master - 0 0 0 connected 5-7 bad 9\n",
        );
        assert_eq!(map.owner(6), Some(&me));
        assert_eq!(map.owner(9), Some(&me));
        assert_eq!(map.owner(8), None);
    }
}
