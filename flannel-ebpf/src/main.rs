//! flannel-ebpf's programs, one per attach point:
//! - `from_pods`: tc ingress on `cni0`, pod traffic towards other nodes is encapsulated and sent
//!   out of the uplink;
//! - `from_host`: tc egress on `cni0`, the node's own traffic to pods on other nodes;
//! - `from_wire`: tc ingress on the uplink, VXLAN for this node is decapsulated and, like any
//!   packet for a local pod, handed to `cni0`;
//! - `from_wire_xdp`: XDP on the uplink, decapsulation before the stack allocates an skb;
//! - `to_wire`: tc egress on the uplink, masquerade of pod traffic leaving the Network
//!   (`--ip-masq`; replies are translated back by `from_wire`).
//!
//! The entry points are thin; the work is in the `try_*` functions of the attach-point modules,
//! built from the library modules (`parse`, `csum`, `encap`, `fib`, `nat`, `drop`, `maps`).
#![no_std]
#![no_main]

mod csum;
mod drop;
mod encap;
mod fib;
mod from_host;
mod from_pods;
mod from_wire;
mod maps;
mod nat;
mod parse;
mod to_wire;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[classifier]
pub fn from_pods(ctx: TcContext) -> i32 {
    from_pods::run(&ctx)
}

#[classifier]
pub fn from_pod_veth(ctx: TcContext) -> i32 {
    from_pods::run_veth(&ctx)
}

#[classifier]
pub fn from_host(ctx: TcContext) -> i32 {
    from_host::run(&ctx)
}

#[classifier]
pub fn from_wire(ctx: TcContext) -> i32 {
    from_wire::run_tc(&ctx)
}

#[classifier]
pub fn to_wire(ctx: TcContext) -> i32 {
    to_wire::run(&ctx)
}

#[xdp]
pub fn from_wire_xdp(ctx: XdpContext) -> u32 {
    from_wire::run_xdp(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects code that can reach a panic.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
