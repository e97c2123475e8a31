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

/// An `[[apps]]` entry: an app id and its token secret, inline or in a
/// file, hex-encoded. Its `Debug` never shows the secret.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSection {
    /// App id.
    pub id: String,
    /// Hex-encoded secret.
    pub secret: Option<String>,
    /// File holding the hex-encoded secret.
    pub secret_file: Option<PathBuf>,
}

impl std::fmt::Debug for AppSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppSection")
            .field("id", &self.id)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_file", &self.secret_file)
            .finish()
    }
}

impl AppSection {
    /// The secret as hex text and bytes, read from the file if given
    /// (relative to `base`). `field` names the entry in errors, which
    /// never echo the secret; it must be at least `min_len` bytes.
    pub fn load_secret(
        &self,
        base: &Path,
        field: &str,
        min_len: usize,
    ) -> Result<(String, Vec<u8>), ConfigError> {
        let hex_text = match (&self.secret, &self.secret_file) {
            (Some(s), None) => s.trim().to_owned(),
            (None, Some(f)) => {
                let path = resolve(base, f);
                std::fs::read_to_string(&path)
                    .map_err(|source| ConfigError::Io { path, source })?
                    .trim()
                    .to_owned()
            }
            _ => {
                return Err(invalid(field, "give exactly one of secret and secret_file"));
            }
        };
        let bytes =
            hex::decode(&hex_text).map_err(|_| invalid(format!("{field}.secret"), "is not hex"))?;
        if bytes.len() < min_len {
            return Err(invalid(
                format!("{field}.secret"),
                format!(
                    "must be at least {min_len} bytes ({} hex digits)",
                    2 * min_len
                ),
            ));
        }
        Ok((hex_text, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(secret: Option<&str>, file: Option<&str>) -> AppSection {
        AppSection {
            id: "shop".into(),
            secret: secret.map(Into::into),
            secret_file: file.map(Into::into),
        }
    }

    #[test]
    fn secrets_load_inline_or_from_a_file_and_errors_never_echo_them() {
        let dir = tempfile::tempdir().unwrap();
        let hex16 = "00112233445566778899aabbccddeeff";
        std::fs::write(dir.path().join("s.hex"), format!("{hex16}\n")).unwrap();
        let (text, bytes) = app(Some(hex16), None)
            .load_secret(dir.path(), "apps[0]", 16)
            .unwrap();
        assert_eq!((text.as_str(), bytes.len()), (hex16, 16));
        let (_, from_file) = app(None, Some("s.hex"))
            .load_secret(dir.path(), "apps[0]", 16)
            .unwrap();
        assert_eq!(from_file, bytes);
        for (a, expect) in [
            (app(Some(hex16), Some("s.hex")), "exactly one"),
            (app(None, None), "exactly one"),
            (app(Some("zz-not-hex"), None), "apps[0].secret: is not hex"),
            (app(Some("0011"), None), "at least 16 bytes"),
        ] {
            let e = a
                .load_secret(dir.path(), "apps[0]", 16)
                .unwrap_err()
                .to_string();
            assert!(e.contains(expect) && !e.contains("zz-not-hex"), "{e}");
        }
        assert!(!format!("{:?}", app(Some(hex16), None)).contains(hex16));
    }
}
