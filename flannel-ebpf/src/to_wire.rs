//! tc egress on the uplink, attached with `--ip-masq`: masquerade of pod traffic leaving the
//! Network (see [`crate::nat`]). Everything else passes untouched.
use aya_ebpf::programs::TcContext;
use flannel_ebpf_common::program;

use crate::{drop::tc_counted, nat};

pub fn run(ctx: &TcContext) -> i32 {
    tc_counted(ctx, program::TO_WIRE, nat::snat)
}
