//! The one packet-access module: every program reads and writes packet bytes through [`ptr_at`],
//! the single audited bounds check, and parses headers with the helpers below.
use core::mem::size_of;

use aya_ebpf::programs::{TcContext, XdpContext};
use flannel_ebpf_common::reason;
use network_types::{eth::EthHdr, ip::Ipv4Hdr, udp::UdpHdr};

use crate::csum;

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const VXLAN_HLEN: usize = 8;
/// EtherType IPv4 as it sits in the packet (network order), read as a native u16.
pub const ETH_P_IP: [u8; 2] = 0x0800u16.to_be_bytes();
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_SCTP: u8 = 132;
/// `vihl` of an IPv4 header without options.
pub const IPV4_VIHL_NO_OPTIONS: u8 = 0x45;

/// The VXLAN header (RFC 7348).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VxlanHdr {
    pub flags: u8,
    pub _reserved0: [u8; 3],
    pub vni: [u8; 3],
    pub _reserved1: u8,
}

/// Packet memory of either program type.
pub trait Packet {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
    /// The whole packet length (for tc, including non-linear data).
    fn len(&self) -> u32;
}

impl Packet for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        (self.data_end() - self.data()) as u32
    }
}

/// A pointer to a `T` at `offset` bytes into the packet, if the whole `T` lies inside it.
/// This is the only bounds check in the programs; its error is [`reason::DROP_TRUNCATED`].
#[inline(always)]
pub fn ptr_at<T>(pkt: &impl Packet, offset: usize) -> Result<*mut T, u32> {
    let start = pkt.start();
    let end = pkt.end();
    if start + offset + size_of::<T>() > end {
        return Err(reason::DROP_TRUNCATED);
    }
    Ok((start + offset) as *mut T)
}

/// The Ethernet header at the start of the packet.
#[inline(always)]
pub fn eth(pkt: &impl Packet) -> Result<*mut EthHdr, u32> {
    ptr_at::<EthHdr>(pkt, 0)
}

/// Writes the Ethernet addresses of the packet's header at `eth` (from `ptr_at`), byte by byte
/// with volatile stores: a plain copy of a 6-byte array from a map value or the stack into the
/// packet becomes a call to a `memmove` subprogram that the BPF backend leaves behind, on the
/// per-packet path.
#[inline(always)]
pub fn set_macs(eth: *mut EthHdr, dst: Option<[u8; 6]>, src: Option<[u8; 6]>) {
    for i in 0..6 {
        // SAFETY: `eth` came from `ptr_at`, which checked the whole header.
        unsafe {
            if let Some(dst) = dst {
                (&raw mut (*eth).dst_addr[i]).write_volatile(dst[i]);
            }
            if let Some(src) = src {
                (&raw mut (*eth).src_addr[i]).write_volatile(src[i]);
            }
        }
    }
}

/// True if the Ethernet header carries IPv4.
#[inline(always)]
pub fn is_ipv4(eth: *const EthHdr) -> bool {
    // SAFETY: `eth` came from `ptr_at`; the field is read unaligned as bytes.
    let ether_type: [u8; 2] = unsafe {
        core::ptr::addr_of!((*eth).ether_type)
            .cast::<[u8; 2]>()
            .read()
    };
    ether_type == ETH_P_IP
}

/// The IPv4 header at `offset`, checked for version 4 and a sane header length
/// ([`reason::DROP_BAD_IPV4`] otherwise).
#[inline(always)]
pub fn ipv4_at(pkt: &impl Packet, offset: usize) -> Result<*mut Ipv4Hdr, u32> {
    let ip = ptr_at::<Ipv4Hdr>(pkt, offset)?;
    // SAFETY: bounds checked by `ptr_at`.
    let vihl = unsafe { (*ip).vihl };
    if vihl >> 4 != 4 || vihl & 0x0f < 5 {
        return Err(reason::DROP_BAD_IPV4);
    }
    Ok(ip)
}

/// As [`ipv4_at`], and for a header without options also checks the header checksum, as a
/// router does before forwarding (RFC 1812). Headers with options are left to the receiver.
#[inline(always)]
pub fn ipv4_checked_at(pkt: &impl Packet, offset: usize) -> Result<*mut Ipv4Hdr, u32> {
    let ip = ipv4_at(pkt, offset)?;
    // SAFETY: `ip` came from `ptr_at`, which checked all 20 bytes.
    let bytes = unsafe { &*ip.cast::<[u8; IPV4_HLEN]>() };
    if bytes[0] == IPV4_VIHL_NO_OPTIONS && !csum::ipv4_header_ok(bytes) {
        return Err(reason::DROP_BAD_IPV4);
    }
    Ok(ip)
}

/// The UDP header at `offset`.
#[inline(always)]
pub fn udp_at(pkt: &impl Packet, offset: usize) -> Result<*mut UdpHdr, u32> {
    ptr_at::<UdpHdr>(pkt, offset)
}

/// True if `addr` lies in `net`/`mask` (all in network order).
#[inline(always)]
pub fn in_subnet(addr: [u8; 4], net: [u8; 4], mask: [u8; 4]) -> bool {
    u32::from_ne_bytes(addr) & u32::from_ne_bytes(mask) == u32::from_ne_bytes(net)
}

/// True if the IPv4 header describes a fragment (MF set or a non-zero offset).
#[inline(always)]
pub fn is_fragment(ip: *const Ipv4Hdr) -> bool {
    // SAFETY: `ip` came from `ptr_at`.
    let frags = unsafe { (*ip).frags };
    u16::from_be_bytes(frags) & 0x3fff != 0
}

/// Decrements the TTL as a router does and patches the header checksum;
/// [`reason::DROP_TTL_EXCEEDED`] if the packet may not be forwarded.
#[inline(always)]
pub fn decrement_ttl(ip: *mut Ipv4Hdr) -> Result<(), u32> {
    // SAFETY: `ip` came from `ptr_at`.
    unsafe {
        let ttl = (*ip).ttl;
        if ttl <= 1 {
            return Err(reason::DROP_TTL_EXCEEDED);
        }
        let proto = (*ip).proto;
        let old = u16::from_be_bytes([ttl, proto]);
        let new = u16::from_be_bytes([ttl - 1, proto]);
        (*ip).ttl = ttl - 1;
        (*ip).check = csum::replace16((*ip).check, old, new);
    }
    Ok(())
}
