//! Server-Sent Events (docs/api.md, "Server-Sent Events"): a subscribe
//! request with `format=sse` (or `Accept: text/event-stream`), admitted and
//! authorized by `Poller::serve`, streamed here on its Pingora session:
//! the answers of poll after poll, keep-alive comments, until the client
//! leaves or the instance drains.

use crate::answer::Format;
use crate::hold::Holder;
use crate::hold::{count_delivered, woken_by, Client, Ending};
use crate::hub::Polled;
use crate::metrics::{self, Outcome};
use crate::routes::SubscribeRoute;
use crate::subscription::Request;
use bytes::Bytes;
use pingora::protocols::http::ServerSession as Session;
use pingora::{Error, ErrorType, Result};
use std::time::Duration;

/// Interval of SSE keep-alive comments.
pub const SSE_KEEPALIVE: Duration = Duration::from_secs(15);

/// Streams Server-Sent Events until the client leaves or draining.
/// Returns once the stream ended (Ok) or the client left (Err).
/// `cors` are the stream's CORS headers; a client that accepts no bytes for
/// the holder's write timeout is dropped.
pub(crate) async fn stream(
    holder: &Holder,
    cors: Vec<(&'static str, String)>,
    session: &mut Session,
    route: &SubscribeRoute,
    req: Request,
) -> Result<()> {
    let mut h = pingora::http::ResponseHeader::build_no_case(200, Some(6))?;
    h.insert_header("Content-Type", "text/event-stream")?;
    h.insert_header("Cache-Control", "no-store")?;
    // Chunked on HTTP/1.1; an HTTP/1.0 client knows no chunked coding
    // (RFC 9112 §6.1): its stream ends with the connection.
    if session.req_header().version != http::Version::HTTP_10 || session.is_http2() {
        h.insert_header("Transfer-Encoding", "chunked")?;
    }
    for (k, v) in cors {
        h.insert_header(k, v)?;
    }
    session.set_keepalive(None);
    holder
        .write(session.write_response_header(Box::new(h)))
        .await?;
    let hello = Bytes::from_static(b": pollgate\n\n");
    holder
        .write(session.write_response_body(hello, false))
        .await?;
    // Present from the first byte until the stream closes, then lingers.
    let _seat = holder.seat(&req);
    let mut cursor = req.cursor;
    loop {
        let poll = holder
            .hub
            .poll(&req.channels, cursor.clone(), route.first, Format::Sse)
            .await;
        let mut held = match poll {
            Ok(Polled::Ready(answer)) => {
                holder
                    .write(session.write_response_body(answer.body.clone(), false))
                    .await?;
                count_delivered(&answer, false);
                cursor = Some(answer.cursor.clone());
                continue;
            }
            Ok(Polled::Held(held)) => held,
            Err(e) => {
                tracing::warn!(error = %e, "SSE stream ends");
                break;
            }
        };
        let held_gauge = metrics::GaugeGuard::up(&metrics::HELD);
        let ending = loop {
            if holder.life.is_draining() {
                break Ending::Drain; // as in `Holder::hold`
            }
            let ending = tokio::select! {
                woken = held.woken() => woken_by(woken),
                _ = tokio::time::sleep(SSE_KEEPALIVE) => Ending::Timeout,
                _ = session.gone() => Ending::Gone,
            };
            if !matches!(ending, Ending::Timeout) {
                break ending;
            }
            let ping = Bytes::from_static(b": keep-alive\n\n");
            if holder
                .write(session.write_response_body(ping, false))
                .await
                .is_err()
            {
                break Ending::Gone;
            }
        };
        drop(held_gauge);
        match ending {
            Ending::Woken(answer) => {
                holder
                    .write(session.write_response_body(answer.body.clone(), false))
                    .await?;
                count_delivered(&answer, true);
                cursor = Some(answer.cursor.clone());
            }
            Ending::Repoll => {}
            Ending::Gone => {
                Outcome::Disconnected.count();
                return Error::e_explain(ErrorType::ConnectionClosed, "SSE client left")
                    .map_err(|e| e.into_down());
            }
            Ending::Drain | Ending::Timeout => break,
        }
    }
    Outcome::Timeout.count();
    holder.write(session.finish_body()).await
}
