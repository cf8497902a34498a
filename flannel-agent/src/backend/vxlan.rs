//! The vxlan backend's lease data (`{"VNI":1,"VtepMAC":"…"}`) and MTU.
use serde_json::Value;

use super::Mac;
use crate::{config::VxlanConfig, json::field};

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
