//! The vxlan backend's lease data (`{"VNI":1,"VtepMAC":"…"}`) and MTU.
use std::path::Path;

use serde_json::{Map, Value};

use super::Mac;
use crate::{
    Error,
    json::{bool_field, field, u64_field},
};

/// `Backend` options of the vxlan backend (pkg/backend/vxlan/vxlan.go).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    pub vni: u32,
    /// UDP port; flannel's 0 means the kernel default, 8472.
    pub port: u16,
    /// Device MTU override; 0 means uplink MTU minus the overhead.
    pub mtu: u32,
    pub gbp: bool,
    pub direct_routing: bool,
}

impl VxlanConfig {
    /// The vxlan options of a `Backend` object (flannel's defaults: VNI 1, port 8472).
    pub fn parse(path: &Path, obj: &Map<String, Value>) -> Result<Self, Error> {
        let vni = u64_field(path, obj, "VNI")?.unwrap_or(1);
        let vni = u32::try_from(vni)
            .ok()
            .filter(|v| *v < 1 << 24)
            .ok_or_else(|| {
                Error::config(
                    path,
                    "Backend.VNI",
                    format!("{vni} does not fit in 24 bits"),
                )
            })?;
        Ok(Self {
            vni,
            port: super::port_field(path, obj, flannel_ebpf_common::vxlan::DEFAULT_PORT)?,
            mtu: super::mtu_field(path, obj)?,
            gbp: bool_field(path, obj, "GBP")?.unwrap_or(false),
            direct_routing: bool_field(path, obj, "DirectRouting")?.unwrap_or(false),
        })
    }
}

/// What a vxlan lease's `BackendData` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseData {
    pub vni: u32,
    pub vtep_mac: Mac,
}

/// Parses a vxlan lease's `BackendData`.
pub fn lease_data(data: &Value) -> Result<LeaseData, String> {
    let obj = data
        .as_object()
        .ok_or("BackendData: expected {\"VNI\":…,\"VtepMAC\":…}")?;
    let vni = field(obj, "VNI").and_then(Value::as_u64).unwrap_or(0);
    let vni = u32::try_from(vni).map_err(|_| "BackendData.VNI: out of range".to_string())?;
    let mac = field(obj, "VtepMAC")
        .and_then(Value::as_str)
        .ok_or("BackendData.VtepMAC: missing")?
        .parse::<Mac>()
        .and_then(Mac::check_unicast)
        .map_err(|e| format!("BackendData.VtepMAC: {e}"))?;
    Ok(LeaseData { vni, vtep_mac: mac })
}

/// The pod MTU flannel writes to subnet.env for vxlan: the configured MTU, else the uplink's
/// minus 50.
#[must_use]
pub fn mtu(cfg: &VxlanConfig, uplink_mtu: u32) -> u32 {
    if cfg.mtu > 0 {
        cfg.mtu
    } else {
        uplink_mtu.saturating_sub(flannel_ebpf_common::vxlan::MTU_OVERHEAD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_backend_data() {
        let d = lease_data(&serde_json::json!({"VNI": 1, "VtepMAC": "c6:d2:00:11:22:ff"})).unwrap();
        assert_eq!(d.vni, 1);
        assert_eq!(d.vtep_mac.to_string(), "c6:d2:00:11:22:ff");
        assert!(
            lease_data(&serde_json::json!({"VNI": 1}))
                .unwrap_err()
                .contains("VtepMAC")
        );
        assert!(
            lease_data(&serde_json::json!({"VtepMAC": "zz"}))
                .unwrap_err()
                .contains("VtepMAC")
        );
        assert!(lease_data(&Value::Null).is_err());
    }

    #[test]
    fn mtu_is_uplink_minus_50_unless_set() {
        let mut cfg = VxlanConfig {
            vni: 1,
            port: 8472,
            mtu: 0,
            gbp: false,
            direct_routing: false,
        };
        assert_eq!(mtu(&cfg, 1500), 1450);
        cfg.mtu = 1400;
        assert_eq!(mtu(&cfg, 1500), 1400);
    }
}
