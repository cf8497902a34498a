//! Room in front of pods' packets for the encapsulation header.
//!
//! `from_pod_veth` encapsulates a pod's packet with `bpf_skb_adjust_room`, which must reallocate
//! the skb's head when fewer bytes than the overhead (VXLAN 50, udp 28, IPIP 20) lie in front of
//! it: a pod's UDP socket reserves only what its `eth0` asks for (16 bytes, 2 left behind the
//! Ethernet header), so every small packet paid a `kmalloc` and a copy of its head. A bridge
//! asks each of its ports' veth peers for the largest headroom one of its ports needs
//! (`netdev_set_rx_headroom`), and a VXLAN device needs 50 bytes more than an Ethernet header.
//! So a VXLAN device that is a port of `cni0` and stays down (no socket, no traffic, a disabled
//! bridge port) gives every pod's `eth0` the room; it carries `cni0`'s own MAC address and MTU,
//! so that it never changes the bridge's address (the lowest of its ports') nor its MTU (the
//! lowest of its ports'). TCP already reserves ample headroom; this is for everything else.
use rtnetlink::{LinkUnspec, LinkVxlan};
use tracing::{info, warn};

use super::nl_err;
use crate::{
    Error,
    iface::{Link, Netlink},
};

/// The device's name (a VXLAN device, down, a port of `cni0`).
pub const DEVICE: &str = "flannel-hdroom";
/// VNI and UDP port of the device: a pair no tunnel uses (the kernel refuses two VXLAN devices
/// with the same VNI on the same port, even down ones). It never opens its socket.
const VNI: u32 = 0x00ff_ffff;
const PORT: u16 = 65_535;

/// Makes [`DEVICE`] a port of `bridge` with the bridge's address and MTU, creating it if missing
/// (`links`: this tick's listing). A recreated bridge gets it back with its new address.
pub async fn ensure(nl: &Netlink, bridge: &Link, links: &[Link]) -> Result<(), Error> {
    let done = match links.iter().find(|l| l.name == DEVICE) {
        Some(dev)
            if dev.controller == Some(bridge.index)
                && dev.mac == bridge.mac
                && dev.mtu == bridge.mtu =>
        {
            return Ok(());
        }
        Some(dev) => {
            nl.handle()
                .link()
                .set(
                    LinkUnspec::new_with_index(dev.index)
                        .address(bridge.mac.to_vec())
                        .mtu(bridge.mtu)
                        .controller(bridge.index)
                        .build(),
                )
                .execute()
                .await
        }
        None => {
            nl.handle()
                .link()
                .add(
                    LinkVxlan::new(DEVICE, VNI)
                        .port(PORT)
                        .learning(false)
                        .address(bridge.mac.to_vec())
                        .mtu(bridge.mtu)
                        .controller(bridge.index)
                        .build(),
                )
                .execute()
                .await
        }
    };
    done.map_err(nl_err(format!("making {DEVICE} a port of {}", bridge.name)))?;
    info!(device = DEVICE, bridge = %bridge.name, "pods' packets get room for the encapsulation header");
    Ok(())
}

/// Removes [`DEVICE`] (`--cleanup`, or a dataplane that does not encapsulate in eBPF); whether
/// it was there.
pub async fn remove(nl: &Netlink) -> Result<bool, Error> {
    let Some(dev) = nl.link_by_name(DEVICE).await? else {
        return Ok(false);
    };
    nl.handle()
        .link()
        .del(dev.index)
        .execute()
        .await
        .map_err(nl_err(format!("removing {DEVICE}")))?;
    Ok(true)
}

/// [`remove`], for start-up paths where its failure only costs speed.
pub async fn remove_or_warn(nl: &Netlink) {
    match remove(nl).await {
        Ok(true) => info!(device = DEVICE, "removed"),
        Ok(false) => {}
        Err(e) => warn!("{e}"),
    }
}
