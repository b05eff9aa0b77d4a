//! The client listener's accept loop.
//!
//! Pingora's listening service spends about 14 KiB per connection on its
//! own accept task, a boxed closure, a timeout wrapper and buffers — for as
//! long as the connection lives, which for a held poll is minutes. This
//! loop accepts connections itself and hands each one, as a Pingora
//! `Stream`, to the [`Front`] app (Pingora's HTTP/1 session and proxy are
//! still what serve the requests). Connections are unbuffered at L4:
//! requests are small and Pingora's session buffers the header itself.

use crate::front::Front;
use async_trait::async_trait;
use pingora::apps::HttpServerApp;
use pingora::protocols::http::ServerSession;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, SocketDigest, TimingDigest,
};
use pingora::protocols::{Peek, Shutdown, Ssl, Stream, UniqueID, UniqueIDType};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Most bytes gathered before writing (an answer larger than this is
/// written as it comes).
const MAX_GATHER: usize = 16 * 1024;

/// Accept queue length of the client listener.
const BACKLOG: i32 = 8192;

/// A TCP connection as Pingora sees it, without buffers.
#[derive(Debug)]
struct Conn {
    tcp: TcpStream,
    digest: Arc<SocketDigest>,
    pending: Vec<u8>,
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

/// Writes are gathered until the next flush, so that an answer's header and
/// body leave in one segment; the buffer only exists while an answer is
/// being written (Pingora flushes at the end of each answer).
impl AsyncWrite for Conn {
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
                return Pin::new(&mut self.tcp).poll_write(cx, buf);
            }
        }
        self.pending.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.as_mut().poll_drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.as_mut().poll_drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl Conn {
    /// Writes out everything gathered; frees the buffer once empty.
    fn poll_drain(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let this = &mut *self;
            let n = match Pin::new(&mut this.tcp).poll_write(cx, &this.pending) {
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
impl Shutdown for Conn {
    async fn shutdown(&mut self) {
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut self.tcp).await;
    }
}

impl UniqueID for Conn {
    fn id(&self) -> UniqueIDType {
        self.tcp.as_raw_fd()
    }
}

impl Ssl for Conn {}

#[async_trait]
impl Peek for Conn {}

impl GetTimingDigest for Conn {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        Vec::new()
    }
}

impl GetProxyDigest for Conn {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        None
    }
}

impl GetSocketDigest for Conn {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        Some(self.digest.clone())
    }
}

/// Serves one HTTP/1 connection: request after request, as Pingora's own
/// HTTP/1 path does (the first request within the header timeout, then the
/// keep-alive each answer sets), without carrying its HTTP/2 negotiation
/// state.
async fn serve_connection(front: Arc<Front>, stream: Stream, shutdown: ShutdownWatch) {
    let session = ServerSession::new_http1(stream);
    let mut next = front.process_new_http(session, &shutdown).await;
    while let Some((stream, settings)) = next.map(|r| r.consume()) {
        let mut session = ServerSession::new_http1(stream);
        if let Some(settings) = settings {
            settings.apply_to_session(&mut session);
        }
        next = front.process_new_http(session, &shutdown).await;
    }
}

/// Accepts client connections on a bound socket and serves them with the
/// front door, until shutdown.
pub struct Listener {
    socket: Mutex<Option<std::net::TcpListener>>,
    front: Arc<Front>,
}

impl Listener {
    /// Binds `addr` now, so that a taken port is an error at start.
    pub fn bind(addr: &str, front: Arc<Front>) -> Result<Listener, String> {
        let socket = std::net::TcpListener::bind(addr)
            .map_err(|e| format!("listen: cannot bind {addr}: {e}"))?;
        socket
            .set_nonblocking(true)
            .map_err(|e| format!("listen: {addr}: {e}"))?;
        // A deep accept queue, as Pingora's listeners have: thousands of
        // clients reconnect at once after a deploy. (Listening again only
        // updates the backlog.)
        // SAFETY: a plain syscall on a socket this function owns.
        unsafe {
            libc::listen(socket.as_raw_fd(), BACKLOG);
        }
        Ok(Listener {
            socket: Mutex::new(Some(socket)),
            front,
        })
    }
}

#[async_trait]
impl BackgroundService for Listener {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(socket) = self.socket.lock().ok().and_then(|mut s| s.take()) else {
            return;
        };
        let listener = match tokio::net::TcpListener::from_std(socket) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen");
                return;
            }
        };
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => {
                        let _ = tcp.set_nodelay(true);
                        let digest = Arc::new(SocketDigest::from_raw_fd(tcp.as_raw_fd()));
                        let stream: Stream = Box::new(Conn {
                            tcp,
                            digest,
                            pending: Vec::new(),
                        });
                        let front = self.front.clone();
                        let shutdown = shutdown.clone();
                        tokio::spawn(async move { serve_connection(front, stream, shutdown).await });
                    }
                    Err(e) => {
                        // Out of file descriptors, most likely: back off a little.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                },
                _ = shutdown.changed() => break,
            }
        }
        drop(listener);
        self.front.http_cleanup().await;
    }
}
