//! Empty on purpose: flannel-agent's build.rs depends on this library so that cargo rebuilds the
//! agent (and with it the embedded object) whenever the eBPF crate changes.
#![no_std]
