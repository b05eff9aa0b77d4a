//! Held polls over TLS (HTTP/1.1, one connection each) and over HTTP/2 on
//! TLS (many streams per connection), for the hold scenario's
//! `--transport tls|h2`: what a held poll costs a server behind TLS.
//!
//! The servers under test use certificates made for the run, so the client
//! accepts any certificate (this is a load generator, not a browser).

use crate::adapters::Position;
use crate::Args;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::task::AbortOnDropHandle;

/// How the hold scenario's subscribers reach the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// HTTP/1.1 on plain TCP (the usual subscribers).
    Plain,
    /// HTTP/1.1 on TLS, one connection per held poll.
    Tls,
    /// HTTP/2 on TLS (ALPN h2), `--streams` held polls per connection.
    H2,
}

/// Accepts every certificate.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn connector(alpn: &[u8]) -> TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// What keeps the held polls open: drop it to close them.
pub struct Held {
    _tasks: Vec<AbortOnDropHandle<()>>,
    /// Polls the server accepted (sent and not refused).
    pub sent: usize,
}

/// Opens `args.subscribers` held polls over `transport` (TLS or h2).
pub async fn hold(args: &Args, transport: Transport) -> Held {
    let server = args.sub[0];
    let per_conn = match transport {
        Transport::H2 => args.streams.max(1),
        _ => 1,
    };
    let conns = args.subscribers.div_ceil(per_conn);
    let tls = connector(if transport == Transport::H2 {
        b"h2"
    } else {
        b"http/1.1"
    });
    let name = ServerName::try_from("localhost").expect("name");
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for c in 0..conns {
        let polls: Vec<String> = (c * per_conn..((c + 1) * per_conn).min(args.subscribers))
            .map(|i| format!("{}{}", args.prefix, i % args.channels))
            .collect();
        let (tls, name, sent_tx) = (tls.clone(), name.clone(), sent_tx.clone());
        let server_kind = args.server;
        let task = tokio::spawn(async move {
            let Ok(tcp) = TcpStream::connect(server).await else {
                return;
            };
            let Ok(mut stream) = tls.connect(name, tcp).await else {
                return;
            };
            if transport == Transport::Tls {
                let req = server_kind.poll(&polls[0], &Position::default());
                if stream.write_all(&req).await.is_ok() {
                    let _ = sent_tx.send(1);
                }
                // Hold the connection (and its poll) until aborted.
                std::future::pending::<()>().await;
            }
            let Ok((mut client, connection)) = h2::client::handshake(stream).await else {
                return;
            };
            tokio::spawn(connection);
            let mut responses = Vec::new();
            for channel in &polls {
                let Ok(()) = std::future::poll_fn(|cx| client.poll_ready(cx)).await else {
                    return;
                };
                let request = http::Request::get(format!("https://localhost/sub/{channel}"))
                    .body(())
                    .expect("request");
                if let Ok((response, _)) = client.send_request(request, true) {
                    responses.push(response);
                    let _ = sent_tx.send(1);
                }
            }
            std::future::pending::<()>().await;
            drop(responses);
        });
        tasks.push(AbortOnDropHandle::new(task));
        if c % 200 == 199 {
            tokio::task::yield_now().await;
        }
    }
    drop(sent_tx);
    let mut sent = 0;
    // Until every poll is sent, or none was for a while (refused ones).
    while let Ok(Some(n)) = tokio::time::timeout(Duration::from_secs(10), sent_rx.recv()).await {
        sent += n;
        if sent >= args.subscribers {
            break;
        }
    }
    Held {
        _tasks: tasks,
        sent,
    }
}
