//! TLS on the client listener: the certificate and key of `tls:`, served
//! by rustls with ALPN `h2` and `http/1.1`; each connection is a
//! [`TlsConn`] (`conn.rs`).
//!
//! The pair is re-read when its files change (a cert-manager rotation
//! swaps the Secret's files) and on SIGHUP ([`Certificates::reload`]). New
//! handshakes use the new pair; open connections keep the one they began
//! with. A pair that cannot be read or does not match is refused with a log
//! line, and the previous one stays in use.
//!
//! The files are read (and their metadata checked) on tokio's blocking
//! pool, never on a worker of the runtime that holds the polls: a read
//! that blocks, on a hung network mount say, stalls no poll. One read at a
//! time: while one is under way, checks are skipped.

use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, CryptoProvider, ResolvesServerCert, ServerConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

mod conn;
pub(crate) use conn::TlsConn;

/// How often the certificate files are checked for a change.
const FILES_CHECK: Duration = Duration::from_secs(2);

/// The serving certificate and the files it comes from.
#[derive(Debug)]
pub struct Certificates {
    cert: String,
    key: String,
    current: parking_lot::RwLock<Arc<CertifiedKey>>,
    /// Modification times and sizes of both files when last read.
    seen: parking_lot::Mutex<Stamp>,
    /// Whether a read of the files is under way on the blocking pool.
    reading: Arc<AtomicBool>,
}

/// Clears the `reading` flag when the read ends, even by a panic.
struct Reading(Arc<AtomicBool>);

impl Drop for Reading {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

type Stamp = Option<[(SystemTime, u64); 2]>;

fn stamp(cert: &str, key: &str) -> Stamp {
    let one = |p: &str| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    Some([one(cert)?, one(key)?])
}

/// Why a certificate and key pair cannot be served. Its text names the
/// files and the problem.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls: cannot read {cert} / {key}: {why}")]
    Unreadable {
        cert: String,
        key: String,
        why: String,
    },
    #[error("tls: {cert} holds no certificate or {key} no private key")]
    Empty { cert: String, key: String },
    #[error("tls: no crypto provider installed")]
    NoProvider,
    #[error("tls: {cert} and {key} are not a usable pair: {why}")]
    NotAPair {
        cert: String,
        key: String,
        why: String,
    },
    #[error("tls: {cert} / {key} are still being read")]
    Busy { cert: String, key: String },
}

/// The files' stamp, then the pair read and checked.
fn read_stamped(cert: &str, key: &str) -> (Stamp, Result<CertifiedKey, TlsError>) {
    (stamp(cert, key), read_pair(cert, key))
}

/// Reads and checks a certificate chain and its key.
fn read_pair(cert: &str, key: &str) -> Result<CertifiedKey, TlsError> {
    pingora::tls::install_default_crypto_provider();
    let files = || (cert.to_string(), key.to_string());
    let (chain, key_der) = pingora::tls::load_certs_and_key_files(cert, key)
        .map_err(|e| {
            let (cert, key) = files();
            TlsError::Unreadable {
                cert,
                key,
                why: e.to_string(),
            }
        })?
        .ok_or_else(|| {
            let (cert, key) = files();
            TlsError::Empty { cert, key }
        })?;
    let provider = CryptoProvider::get_default().ok_or(TlsError::NoProvider)?;
    CertifiedKey::from_der(chain, key_der, provider).map_err(|e| {
        let (cert, key) = files();
        TlsError::NotAPair {
            cert,
            key,
            why: e.to_string(),
        }
    })
}

impl Certificates {
    /// Reads `cert` and `key` (PEM). The error names the file and the problem.
    pub fn load(cert: &str, key: &str) -> Result<Arc<Certificates>, TlsError> {
        let seen = stamp(cert, key);
        let pair = read_pair(cert, key)?;
        Ok(Arc::new(Certificates {
            cert: cert.to_string(),
            key: key.to_string(),
            current: parking_lot::RwLock::new(Arc::new(pair)),
            seen: parking_lot::Mutex::new(seen),
            reading: Arc::new(AtomicBool::new(false)),
        }))
    }

    /// Runs `read` on the two paths on tokio's blocking pool and returns
    /// what it returns; None, without reading, while another read is under
    /// way (or when the read could not run).
    async fn read_files<T: Send + 'static>(&self, read: fn(&str, &str) -> T) -> Option<T> {
        if self.reading.swap(true, Ordering::AcqRel) {
            return None;
        }
        let done = Reading(self.reading.clone());
        let (cert, key) = (self.cert.clone(), self.key.clone());
        tokio::task::spawn_blocking(move || {
            let _done = done;
            read(&cert, &key)
        })
        .await
        .ok()
    }

    /// Puts `pair`, read when the files had stamp `seen`, in use.
    fn install(&self, seen: Stamp, pair: CertifiedKey) {
        *self.current.write() = Arc::new(pair);
        *self.seen.lock() = seen;
    }

    /// Reads the pair again now, off the runtime. Ok(()) when the new pair
    /// is in use; on an error (or while another read is under way) the
    /// previous one stays.
    pub async fn reload(&self) -> Result<(), TlsError> {
        let (seen, pair) = self.read_files(read_stamped).await.ok_or_else(|| {
            let (cert, key) = (self.cert.clone(), self.key.clone());
            TlsError::Busy { cert, key }
        })?;
        self.install(seen, pair?);
        Ok(())
    }

    /// Reloads when either file changed since it was last read (both
    /// checked and read off the runtime). Returns whether a reload was
    /// tried.
    pub async fn reload_if_changed(&self) -> bool {
        let Some(now) = self.read_files(stamp).await else {
            return false;
        };
        if now.is_none() || now == *self.seen.lock() {
            return false;
        }
        let Some((seen, pair)) = self.read_files(read_stamped).await else {
            return false;
        };
        match pair {
            Ok(pair) => {
                self.install(seen, pair);
                tracing::info!(cert = %self.cert, "tls: certificate reloaded");
            }
            Err(e) => {
                // Keep serving the old pair; try again on the next change.
                *self.seen.lock() = seen;
                tracing::warn!(error = %e, "tls: keeping the previous certificate");
            }
        }
        true
    }

    /// Checks the files every `FILES_CHECK` (2 s) and reloads the pair when
    /// they changed, until `until` resolves.
    pub async fn watch_files(self: Arc<Self>, until: impl std::future::Future<Output = ()>) {
        let mut tick = tokio::time::interval(FILES_CHECK);
        tokio::pin!(until);
        loop {
            tokio::select! {
                _ = tick.tick() => { self.reload_if_changed().await; }
                _ = &mut until => return,
            }
        }
    }

    /// The rustls configuration of the listener's handshakes
    /// ([`TlsConn::accept`]): the current pair (whatever it is at each
    /// handshake), offering HTTP/2 and HTTP/1.1.
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        pingora::tls::install_default_crypto_provider();
        let mut config = ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// Hands every handshake the current pair.
#[derive(Debug)]
struct Resolver(Arc<Certificates>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.read().clone())
    }
}
