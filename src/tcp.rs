//! A client or admin connection's TCP socket as Pingora sees it
//! (`TcpConn`): no read buffer, and writes gathered until Pingora flushes,
//! so that an answer's head and body leave in one segment (a vectored write
//! goes straight out). The socket is shared with the lean path's direct
//! write ([`socket_of`]).

use async_trait::async_trait;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, SocketDigest, TimingDigest,
};
use pingora::protocols::{Peek, Shutdown, Ssl, Stream, UniqueID, UniqueIDType};
use socket2::SockRef;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Most bytes gathered before writing (an answer larger than this is
/// written as it comes).
const MAX_GATHER: usize = 16 * 1024;

/// A TCP connection as Pingora sees it, without buffers.
///
/// The socket is shared ([`socket_of`]): the lean path's direct write
/// holds it too, so the descriptor stays open, and its number cannot go to
/// another connection, until the last holder drops it. Reads and writes
/// therefore go through the socket's readiness (`poll_*_ready`, `try_io`)
/// rather than `&mut` methods, the way tokio's own `TcpStream` does them.
#[derive(Debug)]
pub(crate) struct TcpConn {
    tcp: Arc<TcpStream>,
    /// Made when first asked for (a Pingora session, a per-client limit):
    /// most held polls never need one, and it is some 400 bytes.
    digest: std::sync::OnceLock<Arc<SocketDigest>>,
    pending: Vec<u8>,
}

/// A plain TCP client connection's socket, shared with whoever writes to
/// it from outside the connection's task; None for any other stream (TLS,
/// HTTP/2 sessions). Returns a handle that keeps the socket open.
pub fn socket_of(stream: &Stream) -> Option<Arc<TcpStream>> {
    let io: &dyn pingora::protocols::IO = &**stream;
    io.as_any()
        .downcast_ref::<TcpConn>()
        .map(|conn| conn.tcp.clone())
}

/// A plain TCP connection as a Pingora stream (tests of what is written on it).
#[cfg(test)]
pub(crate) fn plain_stream(tcp: TcpStream) -> Stream {
    Box::new(TcpConn::new(tcp))
}

/// Clears the read readiness that `tcp` last reported, without a syscall.
fn clear_readable(tcp: &TcpStream) {
    let _ = tcp.try_io(Interest::READABLE, || {
        Err::<(), _>(io::ErrorKind::WouldBlock.into())
    });
}

/// Writes `buf` to `tcp` once it is writable.
fn poll_write_tcp(tcp: &TcpStream, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
    loop {
        std::task::ready!(tcp.poll_write_ready(cx))?;
        match tcp.try_write(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            done => return Poll::Ready(done),
        }
    }
}

/// Writes `bufs` to `tcp`, in one syscall, once it is writable.
fn poll_write_vectored_tcp(
    tcp: &TcpStream,
    cx: &mut Context<'_>,
    bufs: &[io::IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    loop {
        std::task::ready!(tcp.poll_write_ready(cx))?;
        match tcp.try_write_vectored(bufs) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            done => return Poll::Ready(done),
        }
    }
}

impl AsyncRead for TcpConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let tcp = &*self.tcp;
        loop {
            std::task::ready!(tcp.poll_read_ready(cx))?;
            // SAFETY: `recv` only writes initialized bytes into the unfilled
            // part, and says how many; only those are marked filled.
            let unfilled = unsafe { buf.unfilled_mut() };
            let len = unfilled.len();
            match tcp.try_io(Interest::READABLE, || SockRef::from(tcp).recv(unfilled)) {
                Ok(n) => {
                    // SAFETY: `recv` initialized these `n` bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    // A short read emptied the socket (epoll): the next read
                    // waits for the next event instead of trying first, as
                    // tokio's own `TcpStream` does.
                    if n > 0 && n < len {
                        clear_readable(tcp);
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Writes are gathered until the next flush, so that an answer's header and
/// body leave in one segment; the buffer only exists while an answer is
/// being written (Pingora flushes at the end of each answer).
impl AsyncWrite for TcpConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.pending.len() + buf.len() > MAX_GATHER {
            if self.as_mut().poll_drain(cx)?.is_pending() {
                return Poll::Pending;
            }
            if buf.len() > MAX_GATHER {
                return poll_write_tcp(&self.tcp, cx, buf);
            }
        }
        self.pending.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    /// A vectored write is taken as whole (the front door's long-poll
    /// answers, Pingora's chunks): straight to the socket unless writes are
    /// being gathered.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.pending.is_empty() {
            return poll_write_vectored_tcp(&self.tcp, cx, bufs);
        }
        let len = bufs.iter().map(|b| b.len()).sum();
        if self.pending.len() + len > MAX_GATHER && self.as_mut().poll_drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        if self.pending.is_empty() {
            return poll_write_vectored_tcp(&self.tcp, cx, bufs);
        }
        for buf in bufs {
            self.pending.extend_from_slice(buf);
        }
        Poll::Ready(Ok(len))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.as_mut().poll_drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.as_mut().poll_drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        Poll::Ready(SockRef::from(&*self.tcp).shutdown(std::net::Shutdown::Write))
    }
}

impl TcpConn {
    pub(crate) fn new(tcp: TcpStream) -> TcpConn {
        TcpConn {
            tcp: Arc::new(tcp),
            digest: std::sync::OnceLock::new(),
            pending: Vec::new(),
        }
    }

    /// Writes out everything gathered; frees the buffer once empty.
    fn poll_drain(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let this = &mut *self;
            let n = match poll_write_tcp(&this.tcp, cx, &this.pending) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            this.pending.drain(..n);
        }
        self.pending = Vec::new();
        Poll::Ready(Ok(()))
    }
}

#[async_trait]
impl Shutdown for TcpConn {
    async fn shutdown(&mut self) {
        let _ = SockRef::from(&*self.tcp).shutdown(std::net::Shutdown::Write);
    }
}

impl UniqueID for TcpConn {
    fn id(&self) -> UniqueIDType {
        self.tcp.as_raw_fd()
    }
}

impl Ssl for TcpConn {}

#[async_trait]
impl Peek for TcpConn {}

impl GetTimingDigest for TcpConn {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        Vec::new()
    }
}

impl GetProxyDigest for TcpConn {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        None
    }
}

impl GetSocketDigest for TcpConn {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        let digest = self
            .digest
            .get_or_init(|| Arc::new(SocketDigest::from_raw_fd(self.tcp.as_raw_fd())));
        Some(digest.clone())
    }
}
