//! One TLS connection of the client listener ([`TlsConn`]): rustls's
//! unbuffered API over the connection's TCP socket, with buffers that
//! exist only while bytes are in them.
//!
//! Why: rustls's buffered connection (what tokio-rustls and Pingora's
//! acceptor drive) keeps a 4 KiB read buffer for as long as the connection
//! lives, and Pingora's TLS stream keeps room for a handshake in either
//! direction beside the connection: 7.5 KiB per connection in all, where a
//! held poll is an idle connection for most of its life. Here the TLS bytes
//! received and not yet processed, the decrypted bytes not yet read and
//! the encrypted bytes not yet sent each live in a buffer that is freed
//! once empty.
//!
//! Writes are encrypted as they come and sent at the next flush (or once
//! [`MAX_OUTGOING`] bytes wait), so that an answer's head and body leave in
//! one write. The peer's end of the connection (its `close_notify`, or the
//! TCP stream's end) reads as the end of the stream.

use crate::tcp::TcpConn;
use async_trait::async_trait;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use rustls::server::{ServerConfig, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Encrypted bytes gathered before they are written without waiting for a
/// flush.
const MAX_OUTGOING: usize = 64 * 1024;

/// Most received TLS bytes held unprocessed: a record is at most 16 KiB
/// and some, a handshake message rustls accepts at most 64 KiB.
const MAX_INCOMING: usize = 80 * 1024;

/// Bytes read from the socket at a time (a whole record and its header).
const READ_CHUNK: usize = 16 * 1024 + 2048 + 5;

/// A server-side TLS connection over a client's TCP socket.
pub(crate) struct TlsConn {
    tcp: TcpConn,
    tls: UnbufferedServerConnection,
    /// TLS bytes received and not yet processed (a partial record).
    incoming: Vec<u8>,
    /// Decrypted bytes not yet read, from `plain_at` on.
    plain: Vec<u8>,
    plain_at: usize,
    /// Encrypted bytes not yet written, from `sent` on.
    outgoing: Vec<u8>,
    sent: usize,
    /// The peer ended its side (`close_notify` or the TCP stream's end):
    /// reads return the end of the stream.
    ended: bool,
    /// Our `close_notify` is queued: nothing more can be written.
    closed: bool,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn")
            .field("tcp", &self.tcp)
            .field("handshaking", &self.tls.is_handshaking())
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

fn tls_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("tls: {e}"))
}

/// Appends what `encode` writes to `out`: `encode` is called with no room
/// first, then with the room it asks for.
fn append<E>(
    out: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, E>,
    needs: impl Fn(&E) -> Option<usize>,
) -> Result<(), E> {
    let at = out.len();
    match encode(&mut []) {
        Ok(_) => return Ok(()),
        Err(e) => {
            let Some(room) = needs(&e) else {
                return Err(e);
            };
            out.resize(at + room, 0);
        }
    }
    match encode(&mut out[at..]) {
        Ok(n) => {
            out.truncate(at + n);
            Ok(())
        }
        Err(e) => {
            out.truncate(at);
            Err(e)
        }
    }
}

fn encode_room(e: &EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

fn encrypt_room(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

/// Where [`TlsConn::drive`] stopped.
#[derive(PartialEq, Eq)]
enum Next {
    /// Application data may be written (and was, when asked for); more
    /// records are awaited.
    Traffic,
    /// The handshake waits for the peer's next records.
    Handshake,
    /// Both sides said `close_notify`: nothing more goes either way.
    Closed,
}

/// What [`TlsConn::drive`] does once application data may be written.
#[derive(Clone, Copy)]
enum Then<'d> {
    /// Nothing: stop there.
    Stop,
    /// Encrypt these bytes into `outgoing`.
    Encrypt(&'d [u8]),
    /// Queue `close_notify` into `outgoing`.
    CloseNotify,
}

impl TlsConn {
    /// Accepts a TLS connection on `tcp` with `config`: the handshake,
    /// until application data can flow both ways. Returns the connection,
    /// or why the handshake failed (the caller bounds its time).
    pub(crate) async fn accept(tcp: TcpConn, config: Arc<ServerConfig>) -> io::Result<TlsConn> {
        let tls = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut conn = TlsConn {
            tcp,
            tls,
            incoming: Vec::new(),
            plain: Vec::new(),
            plain_at: 0,
            outgoing: Vec::new(),
            sent: 0,
            ended: false,
            closed: false,
        };
        loop {
            let next = conn.drive(Then::Stop)?;
            conn.flush().await?;
            if next == Next::Traffic && !conn.tls.is_handshaking() {
                return Ok(conn);
            }
            if conn.ended {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            std::future::poll_fn(|cx| conn.poll_fill(cx)).await?;
        }
    }

    /// Processes the received records until rustls waits for more:
    /// handshake messages answered into `outgoing`, application data
    /// decrypted into `plain`; then does `then`. Returns where rustls
    /// stopped.
    fn drive(&mut self, then: Then<'_>) -> io::Result<Next> {
        loop {
            let UnbufferedStatus { discard, state } =
                self.tls.process_tls_records(&mut self.incoming);
            let stop = match state.map_err(tls_error)? {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(tls_error)?;
                        // Always 0 while rustls decrypts out of place; a
                        // later rustls may ask for more to be discarded.
                        debug_assert_eq!(record.discard, 0);
                        self.plain.extend_from_slice(record.payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut data) => {
                    append(&mut self.outgoing, |out| data.encode(out), encode_room)
                        .map_err(tls_error)?;
                    None
                }
                // Sent before anything written later: `outgoing` is sent in
                // order, so the records count as transmitted once in it.
                ConnectionState::TransmitTlsData(sent) => {
                    sent.done();
                    None
                }
                ConnectionState::PeerClosed => {
                    self.ended = true;
                    None
                }
                ConnectionState::Closed => {
                    self.ended = true;
                    Some(Next::Closed)
                }
                ConnectionState::WriteTraffic(mut traffic) => {
                    let out = &mut self.outgoing;
                    match then {
                        Then::Stop => Ok(()),
                        Then::Encrypt(data) => {
                            append(out, |out| traffic.encrypt(data, out), encrypt_room)
                        }
                        Then::CloseNotify => {
                            append(out, |out| traffic.queue_close_notify(out), encrypt_room)
                        }
                    }
                    .map_err(tls_error)?;
                    Some(Next::Traffic)
                }
                ConnectionState::BlockedHandshake => Some(Next::Handshake),
                // Early data is not accepted (the config allows none).
                _ => return Err(tls_error("unexpected state")),
            };
            self.incoming.drain(..discard);
            if let Some(next) = stop {
                if self.incoming.is_empty() {
                    self.incoming = Vec::new();
                }
                return Ok(next);
            }
        }
    }

    /// Reads what the socket has into `incoming`. Ready(Ok(())) when bytes
    /// were read or the peer ended the stream (`ended`).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.incoming.len() >= MAX_INCOMING {
            return Poll::Ready(Err(tls_error("record too large")));
        }
        // Read into the stack first, so that a connection waiting for
        // bytes holds no buffer.
        let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut buf = ReadBuf::uninit(&mut chunk);
        std::task::ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut buf))?;
        if buf.filled().is_empty() {
            self.ended = true;
        } else {
            self.incoming.extend_from_slice(buf.filled());
        }
        Poll::Ready(Ok(()))
    }

    /// Writes `outgoing` out; frees it once sent.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let rest = [io::IoSlice::new(&self.outgoing[self.sent..])];
            match std::task::ready!(Pin::new(&mut self.tcp).poll_write_vectored(cx, &rest))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => self.sent += n,
            }
        }
        self.outgoing = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    async fn flush(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_send(cx)).await
    }

    /// Moves decrypted bytes into `buf`; frees `plain` once all are read.
    fn take_plain(&mut self, buf: &mut ReadBuf<'_>) {
        let n = buf.remaining().min(self.plain.len() - self.plain_at);
        buf.put_slice(&self.plain[self.plain_at..self.plain_at + n]);
        self.plain_at += n;
        if self.plain_at == self.plain.len() {
            self.plain = Vec::new();
            self.plain_at = 0;
        }
    }

    /// Encrypts `data` into `outgoing` (after anything rustls has to send
    /// first).
    fn encrypt(&mut self, data: &[u8]) -> io::Result<()> {
        match self.drive(Then::Encrypt(data))? {
            Next::Traffic => Ok(()),
            _ => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }

    /// Queues `close_notify` (once).
    fn close_notify(&mut self) -> io::Result<()> {
        if std::mem::replace(&mut self.closed, true) {
            return Ok(());
        }
        self.drive(Then::CloseNotify).map(drop)
    }
}

/// A connection dropped without a shutdown (the client left, the request
/// loop ended) still says `close_notify` when the socket takes it at once:
/// a strict client tells a truncated stream from an ended one by it.
impl Drop for TlsConn {
    fn drop(&mut self) {
        if self.closed || self.tls.is_handshaking() {
            return;
        }
        if self.close_notify().is_ok() {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let _ = self.poll_send(&mut cx);
        }
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_at < this.plain.len() {
                this.take_plain(buf);
                return Poll::Ready(Ok(()));
            }
            if this.ended {
                return Poll::Ready(Ok(()));
            }
            if !this.incoming.is_empty() {
                this.drive(Then::Stop)?;
                // Handshake records rustls answers (a key update) go out
                // with the next write; try now, without waiting.
                if this.sent < this.outgoing.len() {
                    let _ = this.poll_send(cx)?;
                }
                if this.plain_at < this.plain.len() || this.ended {
                    continue;
                }
            }
            std::task::ready!(this.poll_fill(cx))?;
        }
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if this.outgoing.len() - this.sent >= MAX_OUTGOING {
            std::task::ready!(this.poll_send(cx))?;
        }
        let take = buf.len().min(MAX_OUTGOING);
        this.encrypt(&buf[..take])?;
        Poll::Ready(Ok(take))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_send(cx)
    }

    /// Sends `close_notify`, then ends the TCP stream's sending side.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.close_notify()?;
        std::task::ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for TlsConn {
    async fn shutdown(&mut self) {
        if let Err(e) = AsyncWriteExt::shutdown(self).await {
            tracing::debug!(error = %e, "TLS shutdown failed");
        }
    }
}

impl UniqueID for TlsConn {
    fn id(&self) -> UniqueIDType {
        self.tcp.id()
    }
}

impl Ssl for TlsConn {
    /// The cipher suite and version, as Pingora's own TLS stream gives them
    /// (no client certificates are asked for).
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        let cipher = self
            .tls
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .unwrap_or_default();
        let version = self
            .tls
            .protocol_version()
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        Some(Arc::new(SslDigest::new(
            cipher,
            version,
            None,
            None,
            Vec::new(),
        )))
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        match self.tls.alpn_protocol()? {
            b"h2" => Some(ALPN::H2),
            b"http/1.1" => Some(ALPN::H1),
            _ => None,
        }
    }
}

#[async_trait]
impl Peek for TlsConn {}

// What Pingora asks of the connection below TLS is the TCP connection's.

impl GetTimingDigest for TlsConn {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.tcp.get_timing_digest()
    }
}

impl GetProxyDigest for TlsConn {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.tcp.get_proxy_digest()
    }
}

impl GetSocketDigest for TlsConn {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.tcp.get_socket_digest()
    }
}
