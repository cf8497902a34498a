//! Verdict and drop-reason accounting: every path through every program ends in one `count`.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use flannel_ebpf_common::{NodeConfig, reason, stats_slot};

use crate::maps::{FLANNEL_STATS, config};

/// Counts a packet of `bytes` under `reason` for `program` ([`flannel_ebpf_common::program`]).
#[inline(always)]
pub fn count(program: u32, reason: u32, bytes: u32) {
    if let Some(counter) = FLANNEL_STATS.get_ptr_mut(stats_slot(program, reason)) {
        // SAFETY: a per-CPU array slot is only touched by this CPU, and the pointer came from a
        // successful lookup.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += u64::from(bytes);
        }
    }
}

/// Runs a tc program body with this node's configuration and counts its outcome: `Ok` carries
/// the action and the verdict counted, `Err` a drop reason (the packet is shot). Without a
/// configuration everything passes.
#[inline(always)]
pub fn tc_counted(
    ctx: &TcContext,
    program: u32,
    body: impl FnOnce(&TcContext, &NodeConfig) -> Result<(i32, u32), u32>,
) -> i32 {
    let len = ctx.len();
    let Some(cfg) = config() else {
        count(program, reason::PASS_NOT_CONFIGURED, len);
        return TC_ACT_OK;
    };
    match body(ctx, cfg) {
        Ok((action, why)) => {
            count(program, why, len);
            action
        }
        Err(why) => {
            count(program, why, len);
            TC_ACT_SHOT
        }
    }
}
