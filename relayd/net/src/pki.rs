//! A development PKI: one cluster CA and a certificate per node, for the
//! demo, tests and first deployments. Production can bring its own CA; the
//! daemons only need PEM files whose names follow [`crate::tls::relay_name`]
//! and [`crate::tls::control_plane_name`].

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::tls::{control_plane_name, relay_name};
use topology::RelayId;

/// Errors while creating certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A file could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A node to issue a certificate for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A relay.
    Relay(u32),
    /// A control-plane node.
    ControlPlane(u64),
    /// An operator or tool (`relayctl`): a client certificate only.
    Operator(String),
}

impl Node {
    /// File stem of the node's certificate and key.
    pub fn stem(&self) -> String {
        match self {
            Node::Relay(id) => format!("relay-{id}"),
            Node::ControlPlane(id) => format!("cp-{id}"),
            Node::Operator(name) => format!("operator-{name}"),
        }
    }

    /// The DNS name its certificate is for.
    pub fn name(&self, domain: &str) -> String {
        match self {
            Node::Relay(id) => relay_name(RelayId(*id), domain),
            Node::ControlPlane(id) => control_plane_name(*id, domain),
            Node::Operator(name) => format!("operator-{name}.{domain}"),
        }
    }
}

/// The CA's key and certificate, able to sign node certificates.
#[derive(Debug)]
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    std::fs::write(path, contents).map_err(io)?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(())
}

fn validity(params: &mut CertificateParams, days: i64) {
    #[allow(clippy::disallowed_methods)] // certificates are dated by the wall clock
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(days);
}

impl Ca {
    /// A new CA valid for ten years.
    pub fn generate(name: &str) -> Result<Ca, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, 3650);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA written by [`Ca::write`].
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| PkiError::Io { path, source })
        };
        let cert_pem = read("ca.pem")?;
        let key = KeyPair::from_pem(&read("ca.key")?)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(Ca { issuer, cert_pem })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes `ca.pem` and `ca.key` (mode 0600) to `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), PkiError> {
        write(&dir.join("ca.pem"), &self.cert_pem, false)?;
        write(
            &dir.join("ca.key"),
            &self.issuer.key().serialize_pem(),
            true,
        )
    }

    /// Issues a certificate for `node`, valid for two years, for server and
    /// client authentication, with its cluster name plus `extra_names`
    /// (DNS names or IP addresses where clients reach it). Returns
    /// `(certificate PEM, key PEM)`.
    pub fn issue(
        &self,
        node: &Node,
        domain: &str,
        extra_names: &[String],
    ) -> Result<(String, String), PkiError> {
        let name = node.name(domain);
        let mut params = CertificateParams::new(vec![name.clone()])?;
        for extra in extra_names {
            let san = match extra.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(extra.clone().try_into()?),
            };
            if !params.subject_alt_names.contains(&san) {
                params.subject_alt_names.push(san);
            }
        }
        params.distinguished_name.push(DnType::CommonName, name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut params, 730);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issues and writes `<stem>.pem` and `<stem>.key` to `dir`.
    pub fn issue_to(
        &self,
        dir: &Path,
        node: &Node,
        domain: &str,
        extra_names: &[String],
    ) -> Result<(), PkiError> {
        let (cert, key) = self.issue(node, domain, extra_names)?;
        write(&dir.join(format!("{}.pem", node.stem())), &cert, false)?;
        write(&dir.join(format!("{}.key", node.stem())), &key, true)
    }
}

/// Names every development certificate carries so that the demo and tests
/// can reach nodes on this machine.
pub fn local_names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
}

/// Creates `dir` with a CA and certificates for `nodes` (a dev cluster).
/// An existing CA in `dir` is reused, so nodes can be added later.
pub fn init_dev_pki(
    dir: &Path,
    nodes: &[Node],
    domain: &str,
    extra_names: &[String],
) -> Result<Ca, PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let ca = if dir.join("ca.pem").is_file() && dir.join("ca.key").is_file() {
        Ca::load(dir)?
    } else {
        let ca = Ca::generate("edge relay development CA")?;
        ca.write(dir)?;
        ca
    };
    let mut names = local_names();
    names.extend(extra_names.iter().cloned());
    for node in nodes {
        ca.issue_to(dir, node, domain, &names)?;
    }
    Ok(ca)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{TlsIdentity, check_name};
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn issued_certificates_load_and_carry_their_names() {
        let dir = tempfile::tempdir().unwrap();
        init_dev_pki(
            dir.path(),
            &[Node::Relay(1), Node::ControlPlane(2)],
            "test.internal",
            &[],
        )
        .unwrap();
        let id = TlsIdentity::load(
            &dir.path().join("ca.pem"),
            &dir.path().join("relay-1.pem"),
            &dir.path().join("relay-1.key"),
            "test.internal",
        )
        .unwrap();
        id.check_relay_name(RelayId(1)).unwrap();
        assert!(id.check_relay_name(RelayId(2)).is_err());
        let cp = std::fs::read(dir.path().join("cp-2.pem")).unwrap();
        let cert = CertificateDer::from_pem_slice(&cp).unwrap();
        check_name(&cert, "cp-2.test.internal").unwrap();
        check_name(&cert, "localhost").unwrap();
        assert_eq!(
            crate::tls::identity(&cert, "test.internal"),
            Some(crate::tls::Identity::ControlPlane(2))
        );
        assert_eq!(crate::tls::identity(&cert, "other.domain"), None);
        // Adding a node later reuses the CA.
        let ca_before = std::fs::read(dir.path().join("ca.pem")).unwrap();
        init_dev_pki(dir.path(), &[Node::Relay(3)], "test.internal", &[]).unwrap();
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);
        TlsIdentity::load(
            &dir.path().join("ca.pem"),
            &dir.path().join("relay-3.pem"),
            &dir.path().join("relay-3.key"),
            "test.internal",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("relay-3.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "keys are private");
    }

    #[test]
    fn mismatched_key_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        init_dev_pki(dir.path(), &[Node::Relay(1), Node::Relay(2)], "t", &[]).unwrap();
        let err = TlsIdentity::load(
            &dir.path().join("ca.pem"),
            &dir.path().join("relay-1.pem"),
            &dir.path().join("relay-2.key"),
            "t",
        );
        assert!(err.is_err());
    }
}
