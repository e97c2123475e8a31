//! Client tokens: who may join which channel, in what role, until when.
//!
//! An app's backend issues tokens with the app's secret; relays hold the
//! same secret (from config or the control plane) and check them. A token
//! is `base64url(payload || HMAC-SHA256(secret, payload))` without padding,
//! where the payload is:
//!
//! ```text
//! version u8 (=1) | role u8 | expires u64 (Unix seconds, big-endian)
//! | app (u8 length + UTF-8) | channel (u16 length + UTF-8) | user (u8 length + UTF-8)
//! ```

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::{BufMut, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::wire::client::Role;
use crate::wire::codec::{Reader, WriteExt};

const TOKEN_VERSION: u8 = 1;
const MAC_LEN: usize = 32;
/// Longest token accepted, in base64 characters.
pub const MAX_TOKEN_LEN: usize = 2048;
/// Shortest app secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 16;

/// The claims of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The app.
    pub app: String,
    /// The channel the token admits to.
    pub channel: String,
    /// The user.
    pub user: String,
    /// Publisher or subscriber.
    pub role: Role,
    /// Expiry, Unix seconds.
    pub expires: u64,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not base64, too long or short, or a payload that does not parse.
    #[error("malformed token")]
    Malformed,
    /// The app is not configured on this relay.
    #[error("unknown app {0:?}")]
    UnknownApp(String),
    /// The signature does not match: forged or signed with another secret.
    #[error("bad token signature")]
    BadSignature,
    /// The expiry has passed.
    #[error("token expired")]
    Expired,
    /// The token is for another channel.
    #[error("token is for another channel")]
    WrongChannel,
}

type HmacSha256 = Hmac<Sha256>;

impl Claims {
    fn payload(&self) -> BytesMut {
        let mut p = BytesMut::new();
        p.put_u8(TOKEN_VERSION);
        p.put_u8(self.role.to_u8());
        p.put_u64(self.expires);
        p.put_bytes8(self.app.as_bytes());
        p.put_bytes16(self.channel.as_bytes());
        p.put_bytes8(self.user.as_bytes());
        p
    }

    /// Signs the claims with the app's secret.
    ///
    /// # Panics
    /// When the app or user id is longer than 255 bytes or the channel
    /// longer than 65535: callers issue tokens for their own ids.
    pub fn sign(&self, secret: &[u8]) -> String {
        let mut p = self.payload();
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(&p);
        p.put_slice(&mac.finalize().into_bytes());
        URL_SAFE_NO_PAD.encode(&p)
    }

    /// Checks a token: well formed, signed with the secret of the app it
    /// names (looked up with `secret_of`), not expired at `now_unix`, and
    /// for `channel`.
    pub fn verify<'s>(
        token: &str,
        channel: &str,
        now_unix: u64,
        secret_of: impl FnOnce(&str) -> Option<&'s [u8]>,
    ) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| TokenError::Malformed)?;
        if raw.len() <= MAC_LEN {
            return Err(TokenError::Malformed);
        }
        let (payload, tag) = raw.split_at(raw.len() - MAC_LEN);
        let claims = Self::parse(payload).ok_or(TokenError::Malformed)?;
        let secret =
            secret_of(&claims.app).ok_or_else(|| TokenError::UnknownApp(claims.app.clone()))?;
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(payload);
        // Constant-time comparison.
        mac.verify_slice(tag)
            .map_err(|_| TokenError::BadSignature)?;
        if claims.expires <= now_unix {
            return Err(TokenError::Expired);
        }
        if claims.channel != channel {
            return Err(TokenError::WrongChannel);
        }
        Ok(claims)
    }

    fn parse(payload: &[u8]) -> Option<Claims> {
        let mut r = Reader::new(payload);
        if r.u8().ok()? != TOKEN_VERSION {
            return None;
        }
        let role = Role::from_u8(r.u8().ok()?).ok()?;
        let expires = r.u64().ok()?;
        let app = r.str8("app").ok()?.to_owned();
        let channel = r.str16("channel").ok()?.to_owned();
        let user = r.str8("user").ok()?.to_owned();
        r.finish().ok()?;
        Some(Claims {
            app,
            channel,
            user,
            role,
            expires,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn claims() -> Claims {
        Claims {
            app: "shop".into(),
            channel: "live-1".into(),
            user: "alice".into(),
            role: Role::Publisher,
            expires: 2_000,
        }
    }

    fn secret_of(app: &str) -> Option<&'static [u8]> {
        (app == "shop").then_some(SECRET)
    }

    #[test]
    fn valid_token_verifies() {
        let t = claims().sign(SECRET);
        assert_eq!(Claims::verify(&t, "live-1", 1_000, secret_of), Ok(claims()));
    }

    #[test]
    fn each_failure_has_its_reason() {
        let t = claims().sign(SECRET);
        assert_eq!(
            Claims::verify(&t, "live-2", 1_000, secret_of),
            Err(TokenError::WrongChannel)
        );
        assert_eq!(
            Claims::verify(&t, "live-1", 2_000, secret_of),
            Err(TokenError::Expired)
        );
        let forged = claims().sign(b"another secret, not the app's one");
        assert_eq!(
            Claims::verify(&forged, "live-1", 1_000, secret_of),
            Err(TokenError::BadSignature)
        );
        let mut other = claims();
        other.app = "other".into();
        assert_eq!(
            Claims::verify(&other.sign(SECRET), "live-1", 1_000, secret_of),
            Err(TokenError::UnknownApp("other".into()))
        );
        assert_eq!(
            Claims::verify("!!!", "live-1", 1_000, secret_of),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            Claims::verify("", "live-1", 1_000, secret_of),
            Err(TokenError::Malformed)
        );
        let long = "A".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(
            Claims::verify(&long, "live-1", 1_000, secret_of),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn tampering_with_claims_breaks_the_signature() {
        let t = claims().sign(SECRET);
        let mut raw = URL_SAFE_NO_PAD.decode(&t).unwrap();
        raw[1] = Role::Publisher.to_u8() ^ 3; // subscriber -> publisher style flip
        let tampered = URL_SAFE_NO_PAD.encode(&raw);
        assert!(Claims::verify(&tampered, "live-1", 1_000, secret_of).is_err());
        // Extend expiry.
        let mut raw = URL_SAFE_NO_PAD.decode(&t).unwrap();
        raw[9] = 0xff;
        let tampered = URL_SAFE_NO_PAD.encode(&raw);
        assert_eq!(
            Claims::verify(&tampered, "live-1", 1_000, secret_of),
            Err(TokenError::BadSignature)
        );
    }
}
