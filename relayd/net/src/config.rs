//! What the relay daemon's and the control plane's config files share:
//! the error type, reading a TOML file, relative paths, the TLS section.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::tls::TlsError;

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML, or a key that does not exist, or a wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A value that parses but is not acceptable.
    #[error("{field}: {message}")]
    Invalid {
        /// Which setting.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// Certificates or keys that do not load.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A [`ConfigError::Invalid`].
pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Reads and parses a TOML file.
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// `p` relative to `base` (the config file's folder) unless absolute.
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

/// The `[tls]` section: the cluster CA and this node's certificate and key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// CA certificate(s), PEM.
    pub ca: PathBuf,
    /// This node's certificate, PEM.
    pub cert: PathBuf,
    /// This node's key, PEM.
    pub key: PathBuf,
    /// DNS suffix of node names in certificates.
    #[serde(default = "default_cluster_domain")]
    pub cluster_domain: String,
}

/// DNS suffix of node names in certificates: relay N is `relay-N.<domain>`.
pub fn default_cluster_domain() -> String {
    "relays.internal".into()
}
