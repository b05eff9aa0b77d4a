//! Long-polls served straight on an HTTP/1 connection, without a Pingora
//! session: the front door has parsed the head once, the poll is held on the
//! raw stream, and the answer leaves in one write, its status line and own
//! headers encoded once per [`Answer`] for every waiter it reaches.
//!
//! On plain TCP the answer is written by the task that delivers the message
//! ([`Answerer`]): a publish to thousands of waiters writes to their sockets
//! back to back, instead of waking thousands of tasks to do it.
//!
//! This is the path of nearly every long-poll (a GET without body,
//! authorization or SSE); the rest go through [`Poller::serve`] on a
//! Pingora session. Both share the parse
//! ([`SubscribeHead::parse`](crate::subscription::SubscribeHead::parse)),
//! the admission ([`crate::admission::Admission::admit`]) and the hold
//! ([`crate::hold::Holder::wait`]).

use crate::admission::Admission;
use crate::answer::Answer;
use crate::error::RequestError;
use crate::hold::{self, Client, Ending, Holder, Waited};
use crate::http1::{ConnTimer, Raw};
use crate::metrics::Outcome;
use crate::respond;
use crate::routes::SubscribeRoute;
use crate::subscription::Request;
use crate::waiter::Answerer;
use bytes::BytesMut;
use parking_lot::Mutex;
use pingora::protocols::Stream;
use pingora::{Error, ErrorType};
use socket2::SockRef;
use std::future::Future;
use std::io::IoSlice;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The connection of a poll held on the lean path.
pub struct Exchange<'a> {
    pub stream: &'a mut Stream,
    /// The connection's read buffer: what arrives while the poll is held
    /// (a pipelined request) is kept for the next turn.
    pub buf: &'a mut BytesMut,
    /// The connection's timer: the poll's timeout.
    timer: &'a mut ConnTimer,
    /// Resolves when the instance drains (a poll whose answer was settled
    /// from the delivering task is no longer the hub's to release).
    drained: Pin<&'a mut (dyn Future<Output = ()> + Send)>,
    /// Most bytes kept that way before the client counts as gone.
    pub max_buffered: usize,
    /// What the connection keeps from one poll to the next.
    kept: &'a mut Kept,
    /// Writes this poll's answer from the delivering task (plain TCP only).
    direct: Option<Arc<DirectWrite>>,
}

/// What the lean path keeps for a connection from one poll to the next:
/// the writer of its answers from the delivering task (plain TCP), made
/// for the first poll, and its share of the timeouts' jitter.
#[derive(Default)]
pub struct Kept {
    direct: Option<Arc<DirectWrite>>,
    /// The connection's share of the jitter ([`hold::shorten`]), drawn
    /// once: each poll's deadline is then later than the one before, and
    /// moves the connection's timer ([`ConnTimer`]) at little cost.
    share: Option<u16>,
}

impl<'a> Exchange<'a> {
    /// The exchange of a request read from `stream` into `buf`.
    pub fn new(raw: &'a mut Raw<'_>, kept: &'a mut Kept) -> Self {
        Exchange {
            stream: &mut *raw.stream,
            buf: &mut *raw.buf,
            timer: &mut *raw.timer,
            drained: raw.drained.as_mut(),
            max_buffered: raw.limits.max_head,
            kept,
            direct: None,
        }
    }
}

impl Client for Exchange<'_> {
    fn answerer(&self) -> Option<Arc<dyn Answerer>> {
        self.direct.clone().map(|d| d as Arc<dyn Answerer>)
    }

    async fn gone(&mut self) {
        gone(self.stream, self.buf, self.max_buffered).await
    }

    fn jittered(&mut self, timeout: Duration) -> Duration {
        let share = *self.kept.share.get_or_insert_with(|| fastrand::u16(..));
        hold::shorten(timeout, share)
    }

    async fn until(&mut self, deadline: Instant) -> Ending {
        tokio::select! {
            biased;
            _ = self.timer.at(deadline) => Ending::Timeout,
            _ = self.drained.as_mut() => Ending::Drain,
            _ = gone(self.stream, self.buf, self.max_buffered) => Ending::Gone,
        }
    }
}

/// Resolves when the client of `stream` has left, or has sent more than
/// `max_buffered` bytes meanwhile. What it sends is kept in `buf`.
async fn gone(stream: &mut Stream, buf: &mut BytesMut, max_buffered: usize) {
    // Read into a few bytes of the poll's own state, not into a buffer
    // allocated for the wait (a held poll keeps none): a client rarely
    // sends anything before its answer, and what it sends is kept.
    let mut probe = [0u8; 64];
    while buf.len() <= max_buffered {
        match stream.read(&mut probe).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&probe[..n]),
        }
        // What the client sent may be its next request, sent because the
        // delivering task already wrote this poll's answer (settled: the
        // poll's task was not woken for it). Reading it took the wake-up
        // the task was counting on, so it lets the task run again at once:
        // the hold then looks at its wake-up slot before waiting, instead
        // of sleeping until the poll's timeout with the answer given.
        tokio::task::yield_now().await;
    }
}

/// What the lean path needs of a request besides its subscription.
#[derive(Clone, Default)]
pub struct Manner {
    /// The client keeps the connection open after the answer.
    pub keepalive: bool,
    /// CORS headers for its Origin.
    pub cors: Vec<(&'static str, String)>,
}

/// Serves one long-poll parsed as `req` (or refused, with a 400)
/// on `route`; `forwarded` is the client its `X-Forwarded-For` names, read
/// only when a per-client limit is on and a proxy is trusted
/// ([`crate::fairness::TrustedProxies::forwarded`]). Returns whether the
/// connection can serve another request.
pub async fn serve(
    (admission, holder): (&Admission, &Holder),
    client: &mut Exchange<'_>,
    req: &Result<Request, RequestError>,
    route: &SubscribeRoute,
    manner: &Manner,
    forwarded: Option<IpAddr>,
) -> bool {
    let req = match req {
        Ok(req) => req,
        Err(e) => return refuse(holder, client, e, manner).await,
    };
    let admitted = admission.admit(|| admission.clients.of_stream(client.stream, forwarded));
    let _admitted = match admitted {
        Ok(admitted) => admitted,
        Err(refused) => {
            return refuse(holder, client, &RequestError::Admission(refused), manner).await
        }
    };
    // On plain TCP (a TLS session's state is the task's), the answer can
    // leave from the delivering task: `Conn` has nothing gathered between
    // two answers, and shares its socket with the writer.
    let direct = match &mut client.kept.direct {
        Some(direct) => Some(direct.clone()),
        none => direct_for(client.stream).inspect(|direct| *none = Some(direct.clone())),
    };
    if let Some(direct) = direct {
        // A poll that takes a presence seat is not settled from the
        // delivering task: its seat is left when its task ends it, which
        // must be when it is answered (the linger counts from then).
        direct.begin(manner.clone(), holder.presence.is_none());
        client.direct = Some(direct);
    }
    // Once it returns, the poll is stopped: no answer is written for it
    // from elsewhere (`Held::stop`).
    let waited = holder.wait(client, req, route).await;
    let direct = client.direct.take();
    match waited {
        Waited::Reply(reply) => {
            // A drain that began meanwhile closes the connection after the
            // answer (its own wait for the drain has ended, if it did).
            let keepalive = manner.keepalive && !reply.close && !holder.life.is_draining();
            let written = match direct.as_deref().map(DirectWrite::settle) {
                // Counted by the delivering task.
                Some(Settled::Sent) => return keepalive,
                Some(Settled::Partly(rest)) => write_whole(holder, client, &rest).await,
                Some(Settled::Unsent) | None => {
                    let whole = whole_answer(&reply.answer, keepalive, &manner.cors);
                    write_whole(holder, client, &whole).await
                }
            };
            if written {
                hold::count_answered(&reply.answer, reply.outcome, reply.live);
            }
            written && keepalive
        }
        Waited::Failed(e) => refuse(holder, client, &RequestError::Hub(e), manner).await,
        Waited::Gone => false,
    }
}

/// An [`Answerer`] writing to a plain TCP socket without blocking: what
/// the socket does not take at once is left to the poll's task. One per
/// connection: the hub calls it for the poll being held, if at all, and
/// never once that poll has stopped ([`Answerer::answer`]).
///
/// It holds the socket itself (shared with the connection's `Conn`), not
/// only a descriptor number: even a write that came late (after the
/// connection ended) could only reach that connection's socket, never
/// another connection that was given the same number. It writes through
/// the number it keeps beside it, so that a delivery reads this writer's
/// memory alone, not the socket's and its readiness's too (three cache
/// misses per answer in a fan-out to thousands).
struct DirectWrite {
    /// Held, never read: it keeps `fd` open.
    _socket: Arc<TcpStream>,
    /// The descriptor of the socket, open as long as this writer lives.
    fd: RawFd,
    turn: Mutex<Turn>,
}

/// The poll a [`DirectWrite`] answers now.
struct Turn {
    manner: Manner,
    /// An answer written whole settles the poll (see [`Answerer::answer`])
    /// when the connection stays open after it.
    settles: bool,
    written: Settled,
}

/// What became of the direct write of a poll's answer.
enum Settled {
    Unsent,
    Sent,
    /// Sent up to these bytes, which the poll's task writes.
    Partly(Vec<u8>),
}

/// The direct writer of a plain TCP connection's answers; None on any
/// other stream.
fn direct_for(stream: &Stream) -> Option<Arc<DirectWrite>> {
    crate::tcp::socket_of(stream).map(|socket| Arc::new(DirectWrite::new(socket)))
}

impl DirectWrite {
    fn new(socket: Arc<TcpStream>) -> DirectWrite {
        DirectWrite {
            fd: socket.as_raw_fd(),
            _socket: socket,
            turn: Mutex::new(Turn {
                manner: Manner::default(),
                settles: false,
                written: Settled::Unsent,
            }),
        }
    }

    /// Makes it the writer of a new poll's answer, in `manner`; an answer
    /// written whole `settles` the poll, or wakes its task.
    fn begin(&self, manner: Manner, settles: bool) {
        *self.turn.lock() = Turn {
            manner,
            settles,
            written: Settled::Unsent,
        };
    }

    /// What was written of the poll's answer (once the poll stopped).
    fn settle(&self) -> Settled {
        std::mem::replace(&mut self.turn.lock().written, Settled::Unsent)
    }
}

impl Answerer for DirectWrite {
    fn answer(&self, answer: &Arc<Answer>) -> bool {
        let mut turn = self.turn.lock();
        let manner = &turn.manner;
        let whole = whole_answer(answer, manner.keepalive, &manner.cors);
        // Straight to the descriptor, not through the socket's readiness
        // (which would read two more allocations): a socket found full is
        // left to the poll's task, whose own write then finds it full and
        // waits for room. The socket is non-blocking; MSG_NOSIGNAL: a
        // closed peer is an error, no SIGPIPE.
        // SAFETY: `fd` is the descriptor of the socket this writer holds
        // open (`_socket`); it is borrowed for this one call.
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
        let sent = match SockRef::from(&fd).send_with_flags(&whole, libc::MSG_NOSIGNAL) {
            Ok(sent) if sent > 0 => sent,
            // Full or failing: the poll's task writes it (and sees the error).
            _ => return false,
        };
        if let Some(rest) = whole.get(sent..).filter(|rest| !rest.is_empty()) {
            turn.written = Settled::Partly(rest.to_vec());
            return false;
        }
        turn.written = Settled::Sent;
        hold::count_answered(answer, Outcome::Message, true);
        // Settled unless the connection closes after it (the poll's task
        // closes it), or the poll's task has more to do at once.
        turn.settles && turn.manner.keepalive
    }
}

/// The bytes of `answer` as written to a client that keeps its connection
/// (`keepalive`) or not, with these CORS headers: shared by every waiter
/// of the answer when they add nothing to it.
fn whole_answer<'a>(
    answer: &'a Answer,
    keepalive: bool,
    cors: &[(&'static str, String)],
) -> std::borrow::Cow<'a, [u8]> {
    if keepalive && cors.is_empty() {
        let body = &answer.body;
        return answer
            .h1_whole(|head| respond::assemble(head, &[], body, true))
            .into();
    }
    respond::assemble(answer.h1_head(), cors, &answer.body, keepalive).into()
}

/// Answers `e`, counting it ([`RequestError::count`]); false when the
/// client could not take it, or the connection closes after it.
async fn refuse(
    holder: &Holder,
    client: &mut Exchange<'_>,
    e: &RequestError,
    manner: &Manner,
) -> bool {
    e.count();
    let whole = crate::error::refusal_answer(e, &[], &manner.cors, manner.keepalive);
    write_whole(holder, client, &whole).await && manner.keepalive
}

/// Writes `whole` straight to the socket (one write, as a rule); gives up
/// when the client takes no bytes for the write timeout. Returns whether
/// it was written.
async fn write_whole(holder: &Holder, client: &mut Exchange<'_>, whole: &[u8]) -> bool {
    let stream = &mut *client.stream;
    let mut rest = whole;
    while !rest.is_empty() {
        // Vectored: the listener's connection then skips its gathering.
        let write = async {
            stream
                .write_vectored(&[IoSlice::new(rest)])
                .await
                .or_else(|e| Error::e_because(ErrorType::WriteError, "writing an answer", e))
        };
        match holder.write(write).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => rest = &rest[n..],
        }
    }
    let flush = async {
        stream
            .flush()
            .await
            .or_else(|e| Error::e_because(ErrorType::WriteError, "writing an answer", e))
    };
    holder.write(flush).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::Format;
    use crate::cursor::Cursor;
    use crate::message::{Message, MessageId};
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    fn an_answer() -> Arc<Answer> {
        answer_of(bytes::Bytes::from_static(b"late"))
    }

    fn answer_of(data: bytes::Bytes) -> Arc<Answer> {
        let first = MessageId::ZERO.next_after();
        let message = Arc::new(Message::new(
            first,
            "news".into(),
            "text/plain".into(),
            data,
        ));
        let at = Cursor(smallvec::smallvec![MessageId::ZERO], Some(1));
        Arc::new(Answer::build(Format::Envelope, &at, false, &[(0, message)]))
    }

    /// What a client's socket does not take at once is left to the poll's
    /// task: all of an answer when the socket is full (nothing settled),
    /// the rest when it takes a part.
    #[tokio::test]
    async fn a_direct_write_leaves_what_the_socket_does_not_take_to_the_polls_task() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = std::net::TcpStream::connect(addr).unwrap(); // never reads
        SockRef::from(&peer).set_recv_buffer_size(4096).unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        SockRef::from(&accepted).set_send_buffer_size(4096).unwrap();
        let stream = crate::tcp::plain_stream(accepted);
        let socket = crate::tcp::socket_of(&stream).unwrap();
        let direct = direct_for(&stream).unwrap();
        let keepalive = || Manner {
            keepalive: true,
            cors: Vec::new(),
        };

        let big = answer_of(bytes::Bytes::from(vec![b'x'; 256 * 1024]));
        direct.begin(keepalive(), true);
        assert!(!direct.answer(&big), "not settled: the poll's task goes on");
        let whole = whole_answer(&big, true, &[]);
        match direct.settle() {
            Settled::Partly(rest) => {
                assert!(!rest.is_empty() && rest.len() < whole.len());
                assert!(whole.ends_with(&rest), "the rest is the answer's end");
            }
            _ => panic!("a part was sent, the rest left"),
        }

        // Fill the socket, then answer again: nothing goes.
        let chunk = [b'y'; 16 * 1024];
        while SockRef::from(&*socket)
            .send_with_flags(&chunk, libc::MSG_DONTWAIT)
            .is_ok()
        {}
        direct.begin(keepalive(), true);
        assert!(!direct.answer(&an_answer()));
        assert!(matches!(direct.settle(), Settled::Unsent));
        drop(peer);
    }

    /// A direct write that comes after its connection closed, when the
    /// descriptor's number went to a newly accepted connection, must not
    /// reach that other client.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_late_direct_write_reaches_no_other_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = an_answer();
        for round in 0..20 {
            let _first = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (accepted, _) = listener.accept().await.unwrap();
            let stream = crate::tcp::plain_stream(accepted);
            let fd = stream.id();
            let direct = direct_for(&stream).expect("a plain TCP connection");
            let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
            // The connection ends: its poll no longer owns the descriptor,
            // whose number the next accept may take.
            drop(stream);
            let (mut other, _) = listener.accept().await.unwrap();
            let reused = other.as_raw_fd() == fd;
            let manner = Manner {
                keepalive: true,
                cors: Vec::new(),
            };
            direct.begin(manner, true);
            direct.answer(&answer);
            drop(direct);
            let mut buf = [0u8; 256];
            for end in [&mut second, &mut other] {
                let read = tokio::time::timeout(Duration::from_millis(50), end.read(&mut buf));
                if let Ok(Ok(n)) = read.await {
                    panic!(
                        "round {round}: another connection (fd {fd} reused: {reused}) received {:?}",
                        String::from_utf8_lossy(&buf[..n])
                    );
                }
            }
        }
    }
}
