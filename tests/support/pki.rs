//! Certificates made for a test (rcgen): an authority, a `localhost`
//! certificate it signed, and an HTTPS client that trusts only it.

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use std::path::Path;

/// A certificate authority and a `localhost` certificate it signed.
pub struct Pki {
    pub ca_pem: String,
    /// The authority's certificate, DER.
    pub ca_der: Vec<u8>,
    pub cert_pem: String,
    pub key_pem: String,
}

pub fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        ca_der: ca_cert.der().to_vec(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// Writes the pair where pollgate reads it (replacing, as a rotation does).
pub fn install(pki: &Pki, cert: &Path, key: &Path) {
    let tmp = cert.with_extension("new");
    std::fs::write(&tmp, &pki.cert_pem).unwrap();
    std::fs::write(key, &pki.key_pem).unwrap();
    std::fs::rename(&tmp, cert).unwrap();
}

/// A client that trusts only `pki`'s authority.
pub fn trusting(pki: &Pki) -> reqwest::Client {
    trusting_builder(pki).build().unwrap()
}

/// The builder of [`trusting`], for further settings (e.g. HTTP/1.1 only).
pub fn trusting_builder(pki: &Pki) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap())
        .pool_max_idle_per_host(0)
}

/// A rustls client config trusting `pki`'s authority, offering `alpn`.
pub fn tls_config(pki: &Pki, alpn: &[u8]) -> std::sync::Arc<rustls::ClientConfig> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone().into()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    std::sync::Arc::new(config)
}
