//! An HTTP/2 client with prior knowledge (h2c) for tests: one connection
//! to pollgate's client listener, requests with chosen header fields (the
//! same name several times, as browsers send cookie crumbs), whole answers.

use super::Pollgate;
use bytes::Bytes;
use h2::client::SendRequest;
use tokio::net::TcpStream;

/// One HTTP/2 connection (prior knowledge) to `pg`'s client listener.
pub async fn connect(pg: &Pollgate) -> SendRequest<Bytes> {
    let tcp = TcpStream::connect(("127.0.0.1", pg.port)).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Sends a GET for `path` with `headers`; returns the response future.
pub async fn get(
    client: &mut SendRequest<Bytes>,
    path: &str,
    headers: &[(&str, &str)],
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let mut req = http::Request::get(format!("http://localhost{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut ready = client.clone().ready().await.unwrap();
    ready.send_request(req.body(()).unwrap(), true).unwrap()
}

/// Status and whole body of a response.
pub async fn answer(response: h2::client::ResponseFuture) -> (u16, http::HeaderMap, Vec<u8>) {
    let r = response.await.unwrap();
    let (parts, mut body) = r.into_parts();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    (parts.status.as_u16(), parts.headers, bytes)
}
