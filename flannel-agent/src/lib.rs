//! flannel-agent: a flanneld-compatible node agent whose dataplane is eBPF.
//!
//! Layout follows flannel's `pkg/`: `config` (net-conf.json), `lease` (lease sources),
//! `backend` (per-backend lease data and MTU), `subnet_env` (/run/flannel/subnet.env), `iface`
//! (choosing the uplink), `dataplane` (programming the kernel), and `agent` (the control loop).
pub mod agent;
pub mod backend;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod error;
pub mod file;
pub mod health;
pub mod iface;
pub mod json;
pub mod lease;
pub mod metrics;
pub mod plan;
pub mod subnet_env;
pub mod trafficmngr;

pub use error::Error;
