//! Verdict and drop-reason accounting: every path through every program ends in one `count`.
use crate::maps::FLANNEL_STATS;

#[inline(always)]
pub fn count(reason: u32, bytes: u32) {
    if let Some(counter) = FLANNEL_STATS.get_ptr_mut(reason) {
        // SAFETY: a per-CPU array slot is only touched by this CPU, and the pointer came from a
        // successful lookup.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += u64::from(bytes);
        }
    }
}
