//! A Curve25519 key (WireGuard's private, public and pre-shared keys): a leaf module, so that
//! the configuration and the backends can both name it.
use std::fmt::Write as _;

use base64::{Engine as _, engine::general_purpose::STANDARD};

/// A Curve25519 key (private, public or pre-shared), 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Key(pub [u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the whole key: private keys must not end up in logs.
        write!(f, "Key({}…)", &self.to_base64()[..8])
    }
}

impl Key {
    /// Parses the base64 form (`wg genkey`, leases, `PSK`).
    pub fn from_base64(s: &str) -> Result<Self, String> {
        let bytes = STANDARD
            .decode(s.trim())
            .map_err(|e| format!("not a base64 key: {e}"))?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| format!("a key is 32 bytes, not {}", b.len()))?;
        Ok(Self(key))
    }

    #[must_use]
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// The hex form of WireGuard's configuration protocol.
    #[must_use]
    pub fn to_hex(&self) -> String {
        self.0.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    pub fn from_hex(s: &str) -> Result<Self, String> {
        if s.len() != 64 {
            return Err(format!("a hex key has 64 digits, not {}", s.len()));
        }
        let mut key = [0u8; 32];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| format!("{s:?} is not hex"))?;
        }
        Ok(Self(key))
    }

    /// A new private key from the kernel's random source, clamped as Curve25519 requires.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)?;
        key[0] &= 0xf8;
        key[31] = (key[31] & 0x7f) | 0x40;
        Ok(Self(key))
    }

    /// The public key of this private key.
    #[must_use]
    pub fn public(&self) -> Self {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        Self(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }
}
