//! Server process-tree readings from /proc: CPU time (user + system),
//! resident memory and open file descriptors, children included.

use std::fs;

const TICKS_PER_SEC: f64 = 100.0;

fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(list) = fs::read_to_string(t.path().join("children")) {
                out.extend(
                    list.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    out
}

/// `pid` and all its descendants.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let kids = children(all[i]);
        all.extend(kids);
        i += 1;
    }
    all
}

/// CPU seconds (user + system) used so far by the trees of `pids`.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    let (user, system) = cpu_split(pids);
    user + system
}

/// CPU seconds used so far by the trees of `pids`: (in user space, in the
/// kernel).
pub fn cpu_split(pids: &[u32]) -> (f64, f64) {
    let (mut user, mut system) = (0u64, 0u64);
    for root in pids {
        for p in tree(*root) {
            if let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) {
                // Fields after the parenthesised command: utime is 14th, stime 15th overall.
                if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                    let f: Vec<&str> = rest.split_whitespace().collect();
                    user += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                    system += f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                }
            }
        }
    }
    (user as f64 / TICKS_PER_SEC, system as f64 / TICKS_PER_SEC)
}

/// Resident memory in bytes of the trees of `pids`.
pub fn rss_bytes(pids: &[u32]) -> u64 {
    let mut kib = 0u64;
    for root in pids {
        for p in tree(*root) {
            if let Ok(status) = fs::read_to_string(format!("/proc/{p}/status")) {
                kib += status
                    .lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    kib * 1024
}

/// Open file descriptors of the trees of `pids` (entries of `/proc/<pid>/fd`).
pub fn open_fds(pids: &[u32]) -> usize {
    pids.iter()
        .flat_map(|root| tree(*root))
        .filter_map(|p| fs::read_dir(format!("/proc/{p}/fd")).ok())
        .map(|d| d.count())
        .sum()
}
