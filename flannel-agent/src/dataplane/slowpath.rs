//! The slow path: tunnel traffic the programs leave to the stack, delivered as flanneld's kernel
//! device would deliver it.
//!
//! `from_wire` decapsulates what it can parse in one pass. Two kinds of our tunnel traffic it
//! hands to the stack instead (counted `pass_fragment` and `pass_ip_options`): outer packets that
//! were fragmented on the way (a peer whose tunnel MTU exceeds the path's), and outer headers
//! with IP options. The stack reassembles the fragments; without a VXLAN device or an `ipip`
//! module nothing would then take the datagram. This receiver does: a UDP socket on the backend's
//! port (vxlan, udp) or a raw socket of protocol 4 (ipip) receives the whole datagram, checks it
//! exactly as `from_wire` does (a known node's, the VNI, the VTEP MAC, an inner IPv4 packet for
//! this node's subnet), lowers the TTL as the fast path does, and sends the inner packet to the
//! stack through a raw socket, which routes it to the pod through `cni0`.
//!
//! Such traffic is rare, so per-datagram cost does not matter; every datagram is counted under
//! program `slow_path` in `FLANNEL_STATS` (`decap_*` when delivered, `slow_path_refused`,
//! `slow_path_send_failed`), beside the programs' own counters.
use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues};
use flannel_ebpf_common::{
    Counter, NodeConfig, RemoteNode, backend, ipip, map_name, program, reason, stats_slot, vxlan,
};
use tracing::{debug, info, warn};

use super::ebpf::PinDir;
use crate::Error;

const VXLAN_HLEN: usize = 8;
const ETH_HLEN: usize = 14;
/// The largest datagram the sockets can hand over.
const MAX_DATAGRAM: usize = 65_536;

/// What the receiver needs to know about this node, read from the pinned maps for every datagram
/// (the agent may change it at run time).
pub trait Node {
    /// The configuration in force, if the dataplane is enabled.
    fn config(&self) -> Option<NodeConfig>;
    /// True if `addr` is a node with a lease (tunnel traffic is accepted only from those).
    fn is_known(&self, addr: [u8; 4]) -> bool;
}

/// The outcome for one datagram: the reason it is counted under, and the inner IPv4 packet to
/// send if it is to be delivered.
#[derive(Debug, PartialEq, Eq)]
pub struct Decision {
    pub reason: u32,
    pub inner: Option<Vec<u8>>,
}

impl Decision {
    fn refuse() -> Self {
        Self {
            reason: reason::SLOW_PATH_REFUSED,
            inner: None,
        }
    }
}

/// What one received datagram is: for vxlan and udp the UDP payload and its source address, for
/// ipip the whole IPv4 packet (outer header first).
pub enum Datagram<'a> {
    Udp { src: Ipv4Addr, payload: &'a [u8] },
    Ipip(&'a [u8]),
}

/// Decides what to do with one datagram of this node's backend, as `from_wire` would.
#[must_use]
pub fn decide(node: &impl Node, datagram: &Datagram<'_>) -> Decision {
    let Some(cfg) = node.config() else {
        return Decision::refuse();
    };
    let (src, inner, tunnel_hops, delivered) = match (cfg.backend as u8, datagram) {
        (backend::VXLAN, Datagram::Udp { src, payload }) => {
            let Some(inner) = vxlan_inner(&cfg, payload) else {
                return Decision::refuse();
            };
            (src.octets(), inner, 0, reason::DECAP_VXLAN)
        }
        // flanneld's proxy decrements the TTL at each tunnel end (proxy_amd64.c).
        (backend::UDP, Datagram::Udp { src, payload }) => {
            (src.octets(), *payload, 1, reason::DECAP_UDP)
        }
        (backend::IPIP, Datagram::Ipip(packet)) => {
            let Some((src, inner)) = ipip_inner(packet) else {
                return Decision::refuse();
            };
            (src, inner, 0, reason::DECAP_IPIP)
        }
        _ => return Decision::refuse(),
    };
    if !node.is_known(src) {
        return Decision::refuse();
    }
    // One router hop on this node, as the fast path's delivery (and flannel.1's forwarding) takes.
    match forwarded(&cfg, inner, 1 + tunnel_hops) {
        Some(packet) => Decision {
            reason: delivered,
            inner: Some(packet),
        },
        None => Decision::refuse(),
    }
}

/// The inner IPv4 packet of a VXLAN payload for this node: the I flag, this node's VNI and VTEP
/// MAC, an IPv4 `EtherType`.
fn vxlan_inner<'a>(cfg: &NodeConfig, payload: &'a [u8]) -> Option<&'a [u8]> {
    let hdr = payload.get(..VXLAN_HLEN + ETH_HLEN)?;
    let vni = u32::from_be_bytes([0, hdr[4], hdr[5], hdr[6]]);
    let ours = hdr[0] & vxlan::FLAG_VNI != 0
        && vni == cfg.vni
        && hdr[VXLAN_HLEN..VXLAN_HLEN + 6] == cfg.vtep_mac
        && hdr[VXLAN_HLEN + 12..VXLAN_HLEN + 14] == [0x08, 0x00];
    ours.then(|| &payload[VXLAN_HLEN + ETH_HLEN..])
}

/// The outer source and the inner packet of an IPIP datagram (as a raw socket receives it).
fn ipip_inner(packet: &[u8]) -> Option<([u8; 4], &[u8])> {
    let ihl = usize::from(*packet.first()? & 0x0f) * 4;
    if packet[0] >> 4 != 4 || ihl < 20 || packet.len() < ihl || packet[9] != ipip::PROTO {
        return None;
    }
    let src: [u8; 4] = packet[12..16].try_into().ok()?;
    Some((src, &packet[ihl..]))
}

/// The inner packet as this node forwards it to a local pod: a valid IPv4 header (options
/// included), a length that fits, a destination in this node's subnet, the TTL lowered by `hops`
/// and the checksum recomputed; `None` if a router would not forward it.
fn forwarded(cfg: &NodeConfig, inner: &[u8], hops: u8) -> Option<Vec<u8>> {
    let ihl = usize::from(*inner.first()? & 0x0f) * 4;
    if inner[0] >> 4 != 4 || ihl < 20 || inner.len() < ihl || checksum(&inner[..ihl]) != 0 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([inner[2], inner[3]]));
    if total < ihl || total > inner.len() {
        return None;
    }
    let dst = u32::from_ne_bytes(inner[16..20].try_into().ok()?);
    let (net, mask) = (
        u32::from_ne_bytes(cfg.subnet_addr),
        u32::from_ne_bytes(cfg.subnet_mask),
    );
    if dst & mask != net || inner[8] <= hops {
        return None;
    }
    // Ethernet padding after the packet is not part of it.
    let mut packet = inner[..total].to_vec();
    packet[8] -= hops;
    packet[10..12].copy_from_slice(&[0, 0]);
    let sum = checksum(&packet[..ihl]);
    packet[10..12].copy_from_slice(&sum.to_be_bytes());
    Some(packet)
}

/// The Internet checksum of `bytes` (0 over a header whose checksum is right).
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// This node as the pinned maps describe it.
struct Pinned {
    config: Array<MapData, NodeConfig>,
    select: Array<MapData, u32>,
    nodes: HashMap<MapData, [u8; 4], RemoteNode>,
    stats: PerCpuArray<MapData, Counter>,
}

fn open_pin(pins: &PinDir, name: &str) -> Result<MapData, Error> {
    let path = pins.map(name);
    MapData::from_pin(&path).map_err(|e| Error::Pin {
        path,
        message: e.to_string(),
    })
}

fn map_error(name: &str, source: aya::maps::MapError) -> Error {
    Error::Map {
        map: name.into(),
        context: "opening for the slow path".into(),
        source: Box::new(source),
    }
}

impl Pinned {
    fn open(root: &Path) -> Result<Self, Error> {
        let pins = PinDir::new(root);
        Ok(Self {
            config: Array::try_from(Map::Array(open_pin(&pins, map_name::CONFIG)?))
                .map_err(|e| map_error(map_name::CONFIG, e))?,
            select: Array::try_from(Map::Array(open_pin(&pins, map_name::CONFIG_SELECT)?))
                .map_err(|e| map_error(map_name::CONFIG_SELECT, e))?,
            nodes: HashMap::try_from(Map::HashMap(open_pin(&pins, map_name::NODES)?))
                .map_err(|e| map_error(map_name::NODES, e))?,
            stats: PerCpuArray::try_from(Map::PerCpuArray(open_pin(&pins, map_name::STATS)?))
                .map_err(|e| map_error(map_name::STATS, e))?,
        })
    }

    /// Adds one datagram of `bytes` to the slow path's counter for `why`. Only this thread
    /// writes the `slow_path` slots, so a read-modify-write of CPU 0's value cannot race.
    fn count(&mut self, why: u32, bytes: usize) {
        let slot = stats_slot(program::SLOW_PATH, why);
        let updated = self.stats.get(&slot, 0).and_then(|values| {
            let mut values: Vec<Counter> = values.iter().copied().collect();
            values[0].packets += 1;
            values[0].bytes += bytes as u64;
            let values = PerCpuValues::try_from(values)?;
            self.stats.set(slot, values, 0)
        });
        if let Err(e) = updated {
            debug!("slow path: counting: {e}");
        }
    }
}

impl Node for Pinned {
    fn config(&self) -> Option<NodeConfig> {
        let slot = self.select.get(&0, 0).unwrap_or(0) & 1;
        self.config.get(&slot, 0).ok().filter(|c| c.enabled != 0)
    }
    fn is_known(&self, addr: [u8; 4]) -> bool {
        self.nodes.get(&addr, 0).is_ok()
    }
}

/// A raw IPv4 socket of `protocol` (`IPPROTO_RAW` sends packets whose header the caller wrote).
fn raw_socket(protocol: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends an IPv4 packet (header included) to the stack, which routes it by its destination.
fn send_raw(sock: &OwnedFd, packet: &[u8]) -> std::io::Result<()> {
    let dst = SocketAddrV4::new(
        Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]),
        0,
    );
    nix::sys::socket::sendto(
        sock.as_raw_fd(),
        packet,
        &nix::sys::socket::SockaddrIn::from(dst),
        nix::sys::socket::MsgFlags::empty(),
    )
    .map(|_| ())
    .map_err(std::io::Error::from)
}

/// Where the receiver listens.
enum Listener {
    Udp(UdpSocket),
    Ipip(OwnedFd),
}

impl Listener {
    fn bind(backend_kind: u8, port: u16) -> std::io::Result<Self> {
        match backend_kind {
            backend::VXLAN | backend::UDP => {
                Ok(Self::Udp(UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?))
            }
            backend::IPIP => Ok(Self::Ipip(raw_socket(i32::from(ipip::PROTO))?)),
            _ => Err(std::io::Error::other("no tunnel to receive")),
        }
    }

    /// Receives one datagram into `buf` and hands it to `handle`.
    fn receive(&self, buf: &mut [u8], handle: impl FnOnce(&Datagram<'_>)) -> std::io::Result<()> {
        match self {
            Self::Udp(sock) => {
                let (n, from) = sock.recv_from(buf)?;
                let std::net::SocketAddr::V4(from) = from else {
                    return Ok(());
                };
                handle(&Datagram::Udp {
                    src: *from.ip(),
                    payload: &buf[..n],
                });
            }
            Self::Ipip(fd) => {
                let n = nix::sys::socket::recv(
                    fd.as_raw_fd(),
                    buf,
                    nix::sys::socket::MsgFlags::empty(),
                )
                .map_err(std::io::Error::from)?;
                handle(&Datagram::Ipip(&buf[..n]));
            }
        }
        Ok(())
    }
}

/// Starts the slow-path receiver for `backend_kind` (vxlan, udp: on `port`; ipip) next to the
/// dataplane pinned under `pin_root`. Errors come back before anything runs; the thread then
/// lives as long as the agent.
pub fn spawn(pin_root: &Path, backend_kind: u8, port: u16) -> Result<(), Error> {
    let io = |context: &str, source| Error::NetlinkIo {
        context: format!("slow path: {context}"),
        source,
    };
    let mut pinned = Pinned::open(pin_root)?;
    let listener = Listener::bind(backend_kind, port).map_err(|e| io("listening", e))?;
    let sender = raw_socket(libc::IPPROTO_RAW).map_err(|e| io("raw socket", e))?;
    std::thread::Builder::new()
        .name("slow-path".into())
        .spawn(move || {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                let received = listener.receive(&mut buf, |datagram| {
                    let decision = decide(&pinned, datagram);
                    let why = match &decision.inner {
                        Some(packet) => match send_raw(&sender, packet) {
                            Ok(()) => decision.reason,
                            Err(e) => {
                                debug!("slow path: sending: {e}");
                                reason::SLOW_PATH_SEND_FAILED
                            }
                        },
                        None => decision.reason,
                    };
                    let len = match datagram {
                        Datagram::Udp { payload, .. } => payload.len(),
                        Datagram::Ipip(packet) => packet.len(),
                    };
                    pinned.count(why, len);
                });
                if let Err(e) = received {
                    warn!("slow path: receiving: {e}");
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
        })
        .map_err(|e| io("starting its thread", e))?;
    info!(
        backend = backend_kind,
        port, "slow-path receiver for fragmented tunnel traffic and outer IP options"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(NodeConfig);
    impl Node for Fake {
        fn config(&self) -> Option<NodeConfig> {
            Some(self.0)
        }
        fn is_known(&self, addr: [u8; 4]) -> bool {
            addr == [198, 18, 0, 11]
        }
    }

    const VTEP: [u8; 6] = [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x02];

    fn node(kind: u8) -> Fake {
        Fake(NodeConfig {
            enabled: 1,
            backend: u32::from(kind),
            subnet_addr: [10, 244, 2, 0],
            subnet_mask: [255, 255, 255, 0],
            vni: 1,
            vtep_mac: VTEP,
            ..NodeConfig::default()
        })
    }

    /// An IPv4 packet with `options` (a multiple of 4 bytes) and a valid checksum.
    fn inner(dst: [u8; 4], ttl: u8, options: &[u8], len: usize) -> Vec<u8> {
        let ihl = 20 + options.len();
        let mut p = vec![0u8; ihl + len];
        p[0] = 0x40 | (ihl / 4) as u8;
        p[2..4].copy_from_slice(&((ihl + len) as u16).to_be_bytes());
        p[8] = ttl;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 244, 1, 10]);
        p[16..20].copy_from_slice(&dst);
        p[20..ihl].copy_from_slice(options);
        let c = checksum(&p[..ihl]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn vxlan(vni: u8, mac: [u8; 6], packet: &[u8]) -> Vec<u8> {
        let mut v = vec![0x08, 0, 0, 0, 0, 0, vni, 0];
        v.extend_from_slice(&mac);
        v.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x00]);
        v.extend_from_slice(packet);
        v
    }

    const KNOWN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);

    #[test]
    fn a_known_nodes_vxlan_is_delivered_one_hop_lower_with_options_and_padding() {
        let options = [0x07, 0x07, 0x04, 0, 0, 0, 0, 0]; // record route, one slot, + 1 EOL pad
        let p = inner([10, 244, 2, 10], 63, &options[..8], 1400);
        let mut payload = vxlan(1, VTEP, &p);
        payload.extend_from_slice(&[0; 6]); // padding after the packet
        let d = decide(
            &node(backend::VXLAN),
            &Datagram::Udp {
                src: KNOWN,
                payload: &payload,
            },
        );
        assert_eq!(d.reason, reason::DECAP_VXLAN);
        let out = d.inner.unwrap();
        assert_eq!(out.len(), p.len());
        assert_eq!(out[8], 62);
        assert_eq!(checksum(&out[..28]), 0);
        assert_eq!(out[20..], p[20..]);
    }

    #[test]
    fn everything_from_wire_would_refuse_is_refused() {
        let p = inner([10, 244, 2, 10], 63, &[], 100);
        let n = node(backend::VXLAN);
        let cases = [
            (KNOWN, vxlan(2, VTEP, &p)),                         // another VNI
            (KNOWN, vxlan(1, [2, 0, 0, 0, 0, 9], &p)),           // another VTEP MAC
            (Ipv4Addr::new(198, 18, 0, 99), vxlan(1, VTEP, &p)), // unknown node
            (
                KNOWN,
                vxlan(1, VTEP, &inner([10, 244, 3, 10], 63, &[], 100)),
            ), // not for this node
            (KNOWN, vxlan(1, VTEP, &inner([10, 244, 2, 10], 1, &[], 100))), // TTL runs out
            (KNOWN, vxlan(1, VTEP, &p[..60])),                   // truncated
        ];
        for (i, (src, payload)) in cases.iter().enumerate() {
            let d = decide(&n, &Datagram::Udp { src: *src, payload });
            assert_eq!(d, Decision::refuse(), "case {i}");
        }
        let mut bad = p.clone();
        bad[10] ^= 1;
        let d = decide(
            &n,
            &Datagram::Udp {
                src: KNOWN,
                payload: &vxlan(1, VTEP, &bad),
            },
        );
        assert_eq!(d, Decision::refuse(), "bad checksum");
    }

    #[test]
    fn udp_and_ipip_carry_the_inner_packet_as_their_backends_do() {
        let p = inner([10, 244, 2, 10], 63, &[], 200);
        let d = decide(
            &node(backend::UDP),
            &Datagram::Udp {
                src: KNOWN,
                payload: &p,
            },
        );
        assert_eq!(d.reason, reason::DECAP_UDP);
        assert_eq!(d.inner.unwrap()[8], 61, "udp: a hop and a tunnel end");
        let mut outer = inner([198, 18, 0, 12], 64, &[0x01, 0x01, 0x01, 0x00], 0);
        outer[0] = 0x46;
        outer[9] = ipip::PROTO;
        outer.truncate(24);
        outer[12..16].copy_from_slice(&KNOWN.octets());
        outer.extend_from_slice(&p);
        let d = decide(&node(backend::IPIP), &Datagram::Ipip(&outer));
        assert_eq!(d.reason, reason::DECAP_IPIP);
        assert_eq!(d.inner.unwrap()[8], 62);
        outer[12] = 1;
        let d = decide(&node(backend::IPIP), &Datagram::Ipip(&outer));
        assert_eq!(d, Decision::refuse(), "unknown node");
    }
}
