//! tc egress on `cni0`: packets the node itself sends (or its stack forwards, e.g. NodePort
//! traffic after kube-proxy's DNAT) to pods on other nodes. The agent routes each remote subnet
//! through `cni0` as flanneld routes it through `flannel.1` (`<subnet> via <subnet>.0 onlink`),
//! and this program sends those frames on as `from_pods` does; frames for local pods pass untouched.
use aya_ebpf::programs::TcContext;
use flannel_ebpf_common::program;

use crate::{drop::tc_counted, from_pods::to_remote};

pub fn run(ctx: &TcContext) -> i32 {
    tc_counted(ctx, program::FROM_HOST, |ctx, cfg| {
        to_remote(ctx, cfg, true)
    })
}
