use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What every token secret starts with, so a leaked one is easy to recognise in logs and scans.
pub const TOKEN_PREFIX: &str = "butler_";

/// An API token of the HTTP server, as stored: its secret is kept only as a sha256 hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    /// Unique name, given at creation (`butler token create --name NAME`).
    pub name: String,
    /// A read-only token may read everything but cannot launch, reset or cancel.
    pub read_only: bool,
    /// When the token was created.
    pub created_at: DateTime<Utc>,
}

/// A token to store: its name, scope and the hash of its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewToken {
    /// Unique name.
    pub name: String,
    /// Whether the token may only read.
    pub read_only: bool,
    /// [`hash_token`] of the secret.
    pub hash: String,
}

impl NewToken {
    /// A new token with a random 256-bit secret; returns the token to store and the secret,
    /// which is shown once and never stored.
    pub fn generate(name: &str, read_only: bool) -> (NewToken, String) {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let secret = format!("{TOKEN_PREFIX}{}", hex::encode(bytes));
        let token = NewToken {
            name: name.to_owned(),
            read_only,
            hash: hash_token(&secret),
        };
        (token, secret)
    }
}

/// The stored form of a token secret: its sha256, in hex. Secrets are 256 random bits, so a
/// fast hash is enough (no password stretching is needed).
pub fn hash_token(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_differ_and_hash_to_the_stored_hash() {
        let (first, secret) = NewToken::generate("ci", true);
        let (second, other) = NewToken::generate("ci", true);
        assert!(secret.starts_with(TOKEN_PREFIX));
        assert_eq!(secret.len(), TOKEN_PREFIX.len() + 64);
        assert_ne!(secret, other);
        assert_eq!(first.hash, hash_token(&secret));
        assert_ne!(first.hash, second.hash);
        assert!(first.read_only);
    }
}
