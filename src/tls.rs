//! TLS on the client listener: the certificate and key of `tls:`, served
//! through Pingora's rustls acceptor with ALPN `h2` and `http/1.1`.
//!
//! The pair is re-read when its files change (a cert-manager rotation
//! swaps the Secret's files) and on SIGHUP ([`Certificates::reload`]). New
//! handshakes use the new pair; open connections keep the one they began
//! with. A pair that cannot be read or does not match is refused with a log
//! line, and the previous one stays in use.

use pingora::listeners::tls::Acceptor;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, CryptoProvider, ResolvesServerCert, ServerConfig};
use std::sync::Arc;
use std::time::SystemTime;

/// The serving certificate and the files it comes from.
#[derive(Debug)]
pub struct Certificates {
    cert: String,
    key: String,
    current: parking_lot::RwLock<Arc<CertifiedKey>>,
    /// Modification times and sizes of both files when last read.
    seen: parking_lot::Mutex<Stamp>,
}

type Stamp = Option<[(SystemTime, u64); 2]>;

fn stamp(cert: &str, key: &str) -> Stamp {
    let one = |p: &str| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    Some([one(cert)?, one(key)?])
}

/// Reads and checks a certificate chain and its key.
fn read_pair(cert: &str, key: &str) -> Result<CertifiedKey, String> {
    pingora::tls::install_default_crypto_provider();
    let (chain, key_der) = pingora::tls::load_certs_and_key_files(cert, key)
        .map_err(|e| format!("tls: cannot read {cert} / {key}: {e}"))?
        .ok_or_else(|| format!("tls: {cert} holds no certificate or {key} no private key"))?;
    let provider = CryptoProvider::get_default()
        .ok_or_else(|| "tls: no crypto provider installed".to_string())?;
    CertifiedKey::from_der(chain, key_der, provider)
        .map_err(|e| format!("tls: {cert} and {key} are not a usable pair: {e}"))
}

impl Certificates {
    /// Reads `cert` and `key` (PEM). The error names the file and the problem.
    pub fn load(cert: &str, key: &str) -> Result<Arc<Certificates>, String> {
        let seen = stamp(cert, key);
        let pair = read_pair(cert, key)?;
        Ok(Arc::new(Certificates {
            cert: cert.to_string(),
            key: key.to_string(),
            current: parking_lot::RwLock::new(Arc::new(pair)),
            seen: parking_lot::Mutex::new(seen),
        }))
    }

    /// Reads the pair again now. Ok(()) when the new pair is in use; on an
    /// error the previous one stays.
    pub fn reload(&self) -> Result<(), String> {
        let seen = stamp(&self.cert, &self.key);
        let pair = read_pair(&self.cert, &self.key)?;
        *self.current.write() = Arc::new(pair);
        *self.seen.lock() = seen;
        Ok(())
    }

    /// Reloads when either file changed since it was last read. Returns
    /// whether a reload was tried.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamp(&self.cert, &self.key);
        if now.is_none() || now == *self.seen.lock() {
            return false;
        }
        match self.reload() {
            Ok(()) => tracing::info!(cert = %self.cert, "tls: certificate reloaded"),
            Err(e) => {
                // Keep serving the old pair; try again on the next change.
                *self.seen.lock() = now;
                tracing::warn!(error = %e, "tls: keeping the previous certificate");
            }
        }
        true
    }

    /// A Pingora acceptor serving the current pair (whatever it is at each
    /// handshake), offering HTTP/2 and HTTP/1.1.
    pub fn acceptor(self: &Arc<Self>) -> Acceptor {
        pingora::tls::install_default_crypto_provider();
        let mut config = ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Acceptor::from_server_config(Arc::new(config))
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
