//! TLS for the QUIC endpoint: a cluster CA, node certificates named
//! `relay-N.<domain>` (and `cp-N.<domain>` for control-plane nodes),
//! mutual TLS between nodes, tokens (not certificates) for clients.

use std::path::Path;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use topology::RelayId;

/// Why certificates or keys could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the material.
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("TLS client verifier: {0}")]
    Verifier(String),
    /// A certificate does not carry the name it must.
    #[error("certificate is not valid for {name}: {message}")]
    Name {
        /// The expected name.
        name: String,
        /// Why not.
        message: String,
    },
}

/// The crypto provider everything uses (ring: no C toolchain beyond cc).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Name of relay `id`'s certificate.
pub fn relay_name(id: RelayId, domain: &str) -> String {
    format!("relay-{}.{domain}", id.0)
}

/// Name of control-plane node `id`'s certificate.
pub fn control_plane_name(id: u64, domain: &str) -> String {
    format!("cp-{id}.{domain}")
}

/// A node's certificate chain and key, and the cluster CA.
pub struct TlsIdentity {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    domain: String,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("chain_len", &self.chain.len())
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        Self {
            roots: self.roots.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            domain: self.domain.clone(),
        }
    }
}

fn file_err(path: &Path, message: impl ToString) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

impl TlsIdentity {
    /// Loads the CA certificate(s), this node's chain and its key (PEM).
    pub fn load(ca: &Path, cert: &Path, key: &Path, domain: &str) -> Result<Self, TlsError> {
        let ca_certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
            .map_err(|e| file_err(ca, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| file_err(ca, e))?;
        if ca_certs.is_empty() {
            return Err(file_err(ca, "no certificate in file"));
        }
        let mut roots = RootCertStore::empty();
        for c in ca_certs {
            roots.add(c).map_err(|e| file_err(ca, e))?;
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| file_err(cert, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| file_err(cert, e))?;
        if chain.is_empty() {
            return Err(file_err(cert, "no certificate in file"));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?;
        let id = Self {
            roots: Arc::new(roots),
            chain,
            key,
            domain: domain.to_owned(),
        };
        // Fail now, not at the first handshake, if key and cert disagree.
        id.server_crypto(&[])?;
        Ok(id)
    }

    /// From material already in memory (tests, tools).
    pub fn from_pem(ca: &str, cert: &str, key: &str, domain: &str) -> Result<Self, TlsError> {
        let mem = Path::new("<memory>");
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
            roots
                .add(c.map_err(|e| file_err(mem, e))?)
                .map_err(|e| file_err(mem, e))?;
        }
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_err(mem, e))?;
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| file_err(mem, e))?;
        Ok(Self {
            roots: Arc::new(roots),
            chain,
            key,
            domain: domain.to_owned(),
        })
    }

    /// The cluster domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The CA roots.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// A QUIC endpoint serving `server` on a bound `socket`, whose stateless-reset
    /// key is derived from this node's private key: after a restart the
    /// node still recognises its old connections' reset tokens, so peers
    /// holding a stale connection to it learn at their next packet that
    /// it is gone (instead of after the idle timeout) and reconnect.
    pub fn quic_endpoint(
        &self,
        server: quinn::ServerConfig,
        socket: std::net::UdpSocket,
    ) -> std::io::Result<quinn::Endpoint> {
        use sha2::Digest;
        let seed = sha2::Sha256::new()
            .chain_update(b"edge-relay stateless reset v1")
            .chain_update(self.key.secret_der())
            .finalize();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &seed);
        let config = quinn::EndpointConfig::new(Arc::new(key));
        let runtime = quinn::default_runtime()
            .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
        quinn::Endpoint::new(config, Some(server), socket, runtime)
    }

    /// Checks that our own certificate is the one of relay `id`.
    pub fn check_relay_name(&self, id: RelayId) -> Result<(), TlsError> {
        check_name(&self.chain[0], &relay_name(id, &self.domain))
    }

    /// Checks that our own certificate carries `name`.
    pub fn check_own_name(&self, name: &str) -> Result<(), TlsError> {
        check_name(&self.chain[0], name)
    }

    fn server_crypto(&self, alpns: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
        // Clients may come without a certificate (they use tokens); nodes
        // must present one chained to the cluster CA, which the caller
        // checks per ALPN after the handshake.
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
        Ok(cfg)
    }

    /// QUIC server config answering the given ALPNs.
    pub fn quic_server(
        &self,
        alpns: &[&[u8]],
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ServerConfig, TlsError> {
        let crypto = QuicServerConfig::try_from(self.server_crypto(alpns)?)
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        cfg.transport_config(transport);
        Ok(cfg)
    }

    /// QUIC client config that authenticates as this node (mutual TLS).
    pub fn quic_node_client(
        &self,
        alpn: &[u8],
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ClientConfig, TlsError> {
        let mut crypto = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        crypto.alpn_protocols = vec![alpn.to_vec()];
        let crypto =
            QuicClientConfig::try_from(crypto).map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(transport);
        Ok(cfg)
    }
}

/// Checks that an end-entity certificate is valid for `name` (its chain was
/// already verified against the CA during the handshake).
pub fn check_name(cert: &CertificateDer<'_>, name: &str) -> Result<(), TlsError> {
    let err = |m: String| TlsError::Name {
        name: name.to_owned(),
        message: m,
    };
    let server_name = ServerName::try_from(name.to_owned()).map_err(|e| err(e.to_string()))?;
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|e| err(e.to_string()))?;
    ee.verify_is_valid_for_subject_name(&server_name)
        .map_err(|e| err(e.to_string()))
}

/// Who a certificate says it is, by the cluster naming convention.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// `relay-<id>.<domain>`.
    Relay(RelayId),
    /// `cp-<id>.<domain>`.
    ControlPlane(u64),
    /// `operator-<name>.<domain>`.
    Operator(String),
}

/// The cluster identity in a certificate's DNS names (its chain was
/// verified against the CA during the handshake). `None` when it has none.
pub fn identity(cert: &CertificateDer<'_>, domain: &str) -> Option<Identity> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    let suffix = format!(".{domain}");
    san.value.general_names.iter().find_map(|n| {
        let GeneralName::DNSName(name) = n else {
            return None;
        };
        let host = name.strip_suffix(suffix.as_str())?;
        if let Some(id) = host.strip_prefix("relay-") {
            return id.parse().ok().map(|id| Identity::Relay(RelayId(id)));
        }
        if let Some(id) = host.strip_prefix("cp-") {
            return id.parse().ok().map(Identity::ControlPlane);
        }
        host.strip_prefix("operator-")
            .filter(|n| !n.is_empty())
            .map(|n| Identity::Operator(n.to_owned()))
    })
}

/// The certificate a peer presented on a connection, if any.
pub fn peer_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let any = conn.peer_identity()?;
    let chain = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.into_iter().next()
}

/// The ALPN a connection negotiated.
pub fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let data = conn.handshake_data()?;
    let data = data
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?;
    data.protocol
}

/// Client config for SDK-style clients that trust the given roots.
pub fn quic_client_with_roots(
    roots: Arc<RootCertStore>,
    alpn: &[u8],
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    crypto.alpn_protocols = vec![alpn.to_vec()];
    let crypto =
        QuicClientConfig::try_from(crypto).map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport);
    Ok(cfg)
}
