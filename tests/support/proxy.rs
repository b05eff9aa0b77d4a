//! A TCP proxy for fault tests: forwards a local port to a server (here a
//! redis-server) and, on the test's command, cuts every connection, refuses
//! new ones for a while, or stalls a connection the moment its client sends
//! a chosen command. Plain std threads: two pumps per connection.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A stall armed for connections opened after it was armed.
struct Trigger {
    pattern: Vec<u8>,
    length: Duration,
    first_connection: u64,
}

#[derive(Default)]
struct Shared {
    /// Both ends of every open connection, with the connection's number.
    open: Mutex<Vec<(u64, TcpStream, TcpStream)>>,
    next_connection: AtomicU64,
    refuse_until: Mutex<Option<Instant>>,
    stall_until: Mutex<Option<Instant>>,
    trigger: Mutex<Option<Trigger>>,
    closed: AtomicBool,
}

/// A running proxy; stops (and cuts everything) when dropped.
pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.closed.load(Ordering::Relaxed) {
                    return;
                }
                if let Ok(client) = client {
                    accept(&s, client, upstream);
                }
            }
        });
        Proxy { port, shared }
    }

    /// `redis://127.0.0.1:<port>/0`
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Closes every open connection, both ends, and closes the new ones at
    /// once for `refuse_for`.
    pub fn cut(&self, refuse_for: Duration) {
        *self.shared.refuse_until.lock().unwrap() = Some(Instant::now() + refuse_for);
        for (_, client, server) in self.shared.open.lock().unwrap().drain(..) {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
        }
    }

    /// When a connection opened from now on first carries `pattern` from
    /// its client (e.g. `b"EVALSHA"`), nothing passes on any connection,
    /// either way, for `length`.
    pub fn stall_next_connection_at(&self, pattern: &[u8], length: Duration) {
        *self.shared.trigger.lock().unwrap() = Some(Trigger {
            pattern: pattern.to_vec(),
            length,
            first_connection: self.shared.next_connection.load(Ordering::Relaxed),
        });
    }

    /// Nothing passes on any connection, either way, for `length`, from now.
    pub fn stall(&self, length: Duration) {
        *self.shared.stall_until.lock().unwrap() = Some(Instant::now() + length);
    }

    /// True once an armed stall has fired.
    pub fn stall_fired(&self) -> bool {
        self.shared.stall_until.lock().unwrap().is_some()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Relaxed);
        self.cut(Duration::ZERO);
        // Stalled pumps find their sockets shut and end.
        *self.shared.stall_until.lock().unwrap() = None;
        // Wakes the accept loop so that it sees `closed`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn accept(s: &Arc<Shared>, client: TcpStream, upstream: u16) {
    let refusing = s
        .refuse_until
        .lock()
        .unwrap()
        .is_some_and(|t| Instant::now() < t);
    let server = match TcpStream::connect(("127.0.0.1", upstream)) {
        Ok(server) if !refusing => server,
        _ => {
            // Closed at once: the client sees its connection dropped.
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
    };
    let n = s.next_connection.fetch_add(1, Ordering::Relaxed);
    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    s.open
        .lock()
        .unwrap()
        .push((n, client.try_clone().unwrap(), server.try_clone().unwrap()));
    let up = s.clone();
    std::thread::spawn(move || pump(&up, n, client, server, true));
    let down = s.clone();
    std::thread::spawn(move || pump(&down, n, s2, c2, false));
}

/// Copies `from` to `to` until either side closes; `from_client` says
/// whether this is the client-to-server direction (which fires triggers).
fn pump(s: &Shared, n: u64, mut from: TcpStream, mut to: TcpStream, from_client: bool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let len = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(len) => len,
        };
        if from_client {
            fire(s, n, &buf[..len]);
        }
        while let Some(until) = *s.stall_until.lock().unwrap() {
            if Instant::now() >= until {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if to.write_all(&buf[..len]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
    s.open.lock().unwrap().retain(|(m, _, _)| *m != n);
}

/// Starts the armed stall if connection `n` qualifies and `data` matches.
fn fire(s: &Shared, n: u64, data: &[u8]) {
    let mut trigger = s.trigger.lock().unwrap();
    let Some(t) = trigger.as_ref() else { return };
    let p = &t.pattern;
    if n >= t.first_connection && data.windows(p.len()).any(|w| w == p.as_slice()) {
        *s.stall_until.lock().unwrap() = Some(Instant::now() + t.length);
        *trigger = None;
    }
}
