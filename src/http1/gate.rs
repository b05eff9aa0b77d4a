//! What stands between a Pingora HTTP/1 session and the client connection
//! ([`Gate`]): the session gets the bytes of its own request only (up to its
//! `Content-Length`, or to the end of its chunked body), and what
//! the client pipelines meanwhile is kept for the next request of
//! [`super::serve`]; and [`pingora_refusal`], the JSON 400 for a head
//! Pingora's parser would refuse with a bare one.

use super::chunked::ChunkedEnd;
use crate::error::RequestError;
use bytes::BytesMut;
use pingora::protocols::http::ServerSession;
use pingora::protocols::{self as proto, Stream};
use std::pin::Pin;
use std::sync::Arc;

/// Why Pingora's HTTP/1 parser would refuse the request head `head` (it
/// answers such a head with a 400 without a body), or Ok when it takes it.
/// Run on the heads served on a Pingora session only: the lean path never
/// hands a head to Pingora.
pub(super) async fn pingora_refusal(head: &[u8]) -> Result<(), RequestError> {
    let probe: Stream = Box::new(std::io::Cursor::new(head.to_vec()));
    let mut session = ServerSession::new_http1(probe);
    let why = match session.read_request().await {
        Ok(true) => return Ok(()),
        Ok(false) => "malformed request head".into(),
        Err(e) => match e.context.as_ref().map(ToString::to_string) {
            // The context of a parse error quotes the head itself.
            Some(why) if !why.starts_with("buf:") => why,
            _ => "malformed request head".into(),
        },
    };
    Err(RequestError::BadRequest(why))
}

/// A client connection as a Pingora session reads it: once the session has
/// read the request it was given, what the client sends next (a pipelined
/// request) is kept aside, for the next request of [`super::serve`],
/// instead of reaching the session (which would take it for more of this
/// request's body, or drop the connection). A close is passed on, so that a
/// session holding a poll sees the client leave.
#[derive(Debug)]
pub(super) struct Gate {
    inner: Stream,
    rest: Rest,
    kept: BytesMut,
    /// Most bytes kept aside: past it, the client counts as gone.
    max_kept: usize,
}

/// What is left of the request the session was given.
#[derive(Debug)]
pub(super) enum Rest {
    /// This many bytes of its body (0: the request is read).
    Bytes(u64),
    /// The rest of a chunked body, found as it streams past.
    Chunked(ChunkedEnd),
    /// Its end is not known (an upgrade, or a chunked body that is not
    /// one): everything is passed on, and the connection is not kept after
    /// the answer (see [`super::keepalive`]).
    Open,
}

impl Rest {
    /// What is left of a body that starts with `buffered` (the bytes after
    /// the head already read): Ok(rest) when the body goes on past them,
    /// Err(n) when it ends after the first `n` of them.
    pub(super) fn after(self, buffered: &[u8]) -> Result<Rest, usize> {
        match self {
            Rest::Bytes(length) => match usize::try_from(length) {
                Ok(n) if n <= buffered.len() => Err(n),
                _ => Ok(Rest::Bytes(length - buffered.len() as u64)),
            },
            Rest::Chunked(mut scan) => match scan.feed(buffered) {
                Ok(Some(n)) => Err(n),
                Ok(None) => Ok(Rest::Chunked(scan)),
                Err(_) => Ok(Rest::Open),
            },
            Rest::Open => Ok(Rest::Open),
        }
    }
}

impl Gate {
    pub(super) fn new(inner: Stream, rest: Rest, max_kept: usize) -> Gate {
        Gate {
            inner,
            rest,
            kept: BytesMut::new(),
            max_kept,
        }
    }

    /// The connection and the bytes kept aside, when the session read all
    /// of its request (otherwise the connection cannot serve another).
    pub(super) fn release(self) -> Option<(Stream, BytesMut)> {
        matches!(self.rest, Rest::Bytes(0)).then_some((self.inner, self.kept))
    }
}

impl tokio::io::AsyncRead for Gate {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        match &mut this.rest {
            Rest::Open => Pin::new(&mut this.inner).poll_read(cx, buf),
            Rest::Chunked(scan) => {
                let before = buf.filled().len();
                let read = Pin::new(&mut this.inner).poll_read(cx, buf);
                if let Poll::Ready(Ok(())) = read {
                    match scan.feed(&buf.filled()[before..]) {
                        Ok(None) => {}
                        Ok(Some(n)) => {
                            // The body ends here: what follows is kept.
                            this.kept.extend_from_slice(&buf.filled()[before + n..]);
                            buf.set_filled(before + n);
                            this.rest = Rest::Bytes(0);
                        }
                        Err(_) => this.rest = Rest::Open,
                    }
                }
                read
            }
            Rest::Bytes(allowed) if *allowed > 0 => {
                // At most the rest of this request's body.
                let allowed = *allowed;
                let room = buf
                    .remaining()
                    .min(usize::try_from(allowed).unwrap_or(usize::MAX));
                let mut part = tokio::io::ReadBuf::new(buf.initialize_unfilled_to(room));
                let read = Pin::new(&mut this.inner).poll_read(cx, &mut part);
                let n = part.filled().len();
                if let Poll::Ready(Ok(())) = read {
                    buf.advance(n);
                    this.rest = Rest::Bytes(allowed - n as u64);
                }
                read
            }
            Rest::Bytes(_) => loop {
                // The request is read: keep what comes, report only a close.
                if this.kept.len() > this.max_kept {
                    let e = std::io::Error::other("more than limits.max_head after a request");
                    return Poll::Ready(Err(e));
                }
                this.kept.reserve(1024);
                let spare = this.kept.spare_capacity_mut();
                let mut part = tokio::io::ReadBuf::uninit(spare);
                match Pin::new(&mut this.inner).poll_read(cx, &mut part) {
                    Poll::Ready(Ok(())) => {
                        let n = part.filled().len();
                        if n == 0 {
                            return Poll::Ready(Ok(()));
                        }
                        // SAFETY: `n` bytes of the spare capacity were
                        // initialized by the read.
                        unsafe { this.kept.set_len(this.kept.len() + n) };
                    }
                    other => return other,
                }
            },
        }
    }
}

impl tokio::io::AsyncWrite for Gate {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait::async_trait]
impl proto::Shutdown for Gate {
    async fn shutdown(&mut self) {
        proto::Shutdown::shutdown(&mut *self.inner).await
    }
}

impl proto::UniqueID for Gate {
    fn id(&self) -> proto::UniqueIDType {
        self.inner.id()
    }
}

impl proto::Ssl for Gate {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

#[async_trait::async_trait]
impl proto::Peek for Gate {}

impl proto::GetTimingDigest for Gate {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }
}

impl proto::GetProxyDigest for Gate {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl proto::GetSocketDigest for Gate {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
}
