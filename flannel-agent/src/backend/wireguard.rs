//! The wireguard backend (pkg/backend/wireguard): keys, lease data and MTU.
//!
//! As flanneld: the private key lives in a file (`/run/flannel/wgkey`, or `WIREGUARD_KEY_FILE`),
//! base64 as `wg genkey` prints it, created with mode 0400 when missing and reused otherwise; a
//! key file that exists but does not parse is an error, never silently replaced (peers know the
//! old public key). The lease advertises `{"PublicKey":"<base64>","Port":<ListenPort>}`.
use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _, path::Path};

use serde_json::{Map, Value};

use crate::{
    Error,
    json::{field, str_field, u64_field},
};

/// flannel's `ListenPort` default.
pub const DEFAULT_PORT: u16 = 51_820;

/// `Backend` options of the wireguard backend (pkg/backend/wireguard/wireguard.go).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireguardConfig {
    /// `ListenPort` (default 51820).
    pub listen_port: u16,
    /// `PSK`: a pre-shared key (base64), if any.
    pub psk: Option<String>,
    /// `PersistentKeepaliveInterval` in seconds (0: off).
    pub persistent_keepalive: u16,
    /// `MTU` before the overhead (0: the uplink's); the device gets it minus 80.
    pub mtu: u32,
    /// `Mode`: `separate` (default), `auto` or `ipv4` (IPv6 networks are not supported).
    pub mode: String,
}

impl WireguardConfig {
    /// The wireguard options of a `Backend` object.
    pub fn parse(path: &Path, obj: &Map<String, Value>) -> Result<Self, Error> {
        let mtu = super::mtu_field(path, obj)?;
        let listen_port = u64_field(path, obj, "ListenPort")?.unwrap_or(0);
        let listen_port = match u16::try_from(listen_port) {
            Ok(0) => DEFAULT_PORT,
            Ok(p) => p,
            Err(_) => {
                return Err(Error::config(
                    path,
                    "Backend.ListenPort",
                    format!("{listen_port} is not a UDP port"),
                ));
            }
        };
        let psk = str_field(path, obj, "PSK")?
            .filter(|s| !s.is_empty())
            .map(|s| {
                Key::from_base64(s)
                    .map(|_| s.to_string())
                    .map_err(|e| Error::config(path, "Backend.PSK", e))
            })
            .transpose()?;
        let keepalive = u64_field(path, obj, "PersistentKeepaliveInterval")?.unwrap_or(0);
        let persistent_keepalive = u16::try_from(keepalive).map_err(|_| {
            Error::config(
                path,
                "Backend.PersistentKeepaliveInterval",
                format!("{keepalive} s is out of range (at most 65535)"),
            )
        })?;
        let mode = str_field(path, obj, "Mode")?
            .filter(|s| !s.is_empty())
            .unwrap_or("separate")
            .to_string();
        match mode.as_str() {
            "separate" | "auto" | "ipv4" => {}
            "ipv6" => {
                return Err(Error::Unsupported(format!(
                    "{}: Backend.Mode \"ipv6\": IPv6 pod networks are not supported by flannel-ebpf",
                    path.display()
                )));
            }
            other => {
                return Err(Error::config(
                    path,
                    "Backend.Mode",
                    format!("unknown mode {other:?} (separate, auto, ipv4 or ipv6)"),
                ));
            }
        }
        Ok(Self {
            listen_port,
            psk,
            persistent_keepalive,
            mtu,
            mode,
        })
    }
}

/// What flannel subtracts from the MTU for WireGuard (IPv6 outer header, UDP, WireGuard header
/// and authentication tag).
pub const OVERHEAD: u32 = 80;

pub use super::key::Key;

/// Loads the private key from `path`, or generates one and writes it there (mode 0400, its
/// directory created) as flanneld does. Returns the key and whether it was generated.
pub fn load_or_generate(path: &Path) -> Result<(Key, bool), Error> {
    let err = |message: String| Error::Wireguard {
        context: format!("key file {}", path.display()),
        message,
    };
    match crate::file::read_to_string(path) {
        Ok(text) => Key::from_base64(&text).map(|k| (k, false)).map_err(|e| {
            err(format!(
                "{e} (remove it to generate a new key; peers must then learn the new public key)"
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Key::generate().map_err(|e| err(format!("generating a key: {e}")))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
            }
            // Written under a temporary name and renamed, so a crash never leaves half a key.
            let tmp = path.with_extension("tmp");
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(&tmp)
                .map_err(|e| err(e.to_string()))?;
            f.write_all(key.to_base64().as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| err(e.to_string()))?;
            std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))?;
            Ok((key, true))
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// What a wireguard lease's `BackendData` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseData {
    pub public_key: Key,
    /// The peer's `ListenPort`; 0 when the lease has none: flanneld before v0.26.6 advertised
    /// only its `PublicKey`, and flanneld then uses its own `ListenPort` for that peer (so does
    /// [`crate::dataplane::wireguard::WireguardDevice::sync`] for an endpoint port of 0).
    pub port: u16,
}

/// Parses a wireguard lease's `BackendData`.
pub fn lease_data(data: &Value) -> Result<LeaseData, String> {
    let obj = data
        .as_object()
        .ok_or("BackendData: expected {\"PublicKey\":…,\"Port\":…}")?;
    let public_key = field(obj, "PublicKey")
        .and_then(Value::as_str)
        .ok_or("BackendData.PublicKey: missing")
        .and_then(|s| Key::from_base64(s).map_err(|_| "BackendData.PublicKey: not a base64 key"))
        .map_err(str::to_string)?;
    let port = match field(obj, "Port") {
        // flanneld < v0.26.6 (no `Port`): the peer listens on our port, as flanneld assumes.
        None => 0,
        Some(p) => p
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or("BackendData.Port: not a UDP port")?,
    };
    Ok(LeaseData { public_key, port })
}

/// The `BackendData` this node advertises.
#[must_use]
pub fn advertised(public_key: &Key, port: u16) -> Value {
    serde_json::json!({"PublicKey": public_key.to_base64(), "Port": port})
}

/// The device and pod MTU: flannel's `MTU` option (default: the uplink's) minus the overhead.
#[must_use]
pub fn mtu(cfg: &WireguardConfig, uplink_mtu: u32) -> u32 {
    let base = if cfg.mtu > 0 { cfg.mtu } else { uplink_mtu };
    base.saturating_sub(OVERHEAD)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn public_key_of_rfc7748_vector() {
        // RFC 7748 section 6.1: Alice's private and public keys.
        let private =
            Key::from_hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap();
        assert_eq!(
            private.public().to_hex(),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
        assert_eq!(Key::from_base64(&private.to_base64()).unwrap(), private);
        assert!(
            Key::from_base64("c2hvcnQ=")
                .unwrap_err()
                .contains("32 bytes")
        );
        assert!(
            format!("{private:?}").len() < 20,
            "Debug never prints a whole key"
        );
    }

    #[test]
    fn key_file_is_created_owner_read_only_and_reused() {
        let dir = flannel_tests::ScratchDir::new("wgkey");
        let path = dir.path().join("run/flannel/wgkey");
        let (key, generated) = load_or_generate(&path).unwrap();
        assert!(generated);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o400, "flanneld's mode");
        assert_eq!(key.0[0] & 7, 0, "clamped");
        assert_eq!(key.0[31] & 0xc0, 0x40, "clamped");
        let (again, generated) = load_or_generate(&path).unwrap();
        assert!(!generated);
        assert_eq!(again, key);
        // A broken key file is an error, not replaced.
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "garbage").unwrap();
        let e = load_or_generate(&bad).unwrap_err().to_string();
        assert!(e.contains("not a base64 key"), "{e}");
        assert_eq!(std::fs::read_to_string(&bad).unwrap(), "garbage");
    }

    #[test]
    fn lease_data_round_trips() {
        let key = Key::generate().unwrap().public();
        let data = advertised(&key, 51820);
        assert_eq!(
            lease_data(&data).unwrap(),
            LeaseData {
                public_key: key,
                port: 51820
            }
        );
        assert!(
            lease_data(&serde_json::json!({"publickey": key.to_base64(), "port": 1})).is_ok(),
            "keys matched case-insensitively"
        );
        assert_eq!(
            lease_data(&serde_json::json!({"PublicKey": key.to_base64()}))
                .unwrap()
                .port,
            0,
            "flanneld before v0.26.6 advertises no Port"
        );
        assert!(
            lease_data(&serde_json::json!({"Port": 1}))
                .unwrap_err()
                .contains("PublicKey")
        );
        assert!(lease_data(&serde_json::json!("x")).is_err());
        assert!(lease_data(&serde_json::json!({"PublicKey": "x", "Port": 1})).is_err());
        assert!(
            lease_data(&serde_json::json!({"PublicKey": key.to_base64(), "Port": 70000}))
                .unwrap_err()
                .contains("Port")
        );
        assert!(
            lease_data(&serde_json::json!({"PublicKey": key.to_base64(), "Port": "1"})).is_err()
        );
    }

    #[test]
    fn mtu_is_flannels() {
        let mut cfg = WireguardConfig {
            listen_port: 51820,
            psk: None,
            persistent_keepalive: 0,
            mtu: 0,
            mode: "separate".into(),
        };
        assert_eq!(mtu(&cfg, 1500), 1420);
        cfg.mtu = 1400;
        assert_eq!(
            mtu(&cfg, 1500),
            1320,
            "flannel's MTU option is before the overhead"
        );
    }
}
