//! The agent's errors: each names the file, field, interface or object it is about.
use std::{io, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: {field}: {message}", path.display())]
    Config {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("interface: {0}")]
    Interface(String),
    #[error("netlink: {context}: {source}")]
    Netlink {
        context: String,
        source: rtnetlink::Error,
    },
    #[error("netlink: {context}: {source}")]
    NetlinkIo { context: String, source: io::Error },
    #[error("{}: writing the subnet file: {source}", path.display())]
    SubnetFile { path: PathBuf, source: io::Error },
    #[error("bpffs {}: {message}", path.display())]
    Bpffs { path: PathBuf, message: String },
    /// `--pin-dir` cannot hold our pins (not a directory, not on bpffs): a misconfiguration,
    /// never a reason to fall back to another dataplane.
    #[error("--pin-dir {}: {message}", path.display())]
    PinDir { path: PathBuf, message: String },
    #[error("loading the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {program}: {context}: {source}")]
    Program {
        program: String,
        context: String,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {map}: {context}: {source}")]
    Map {
        map: String,
        context: String,
        source: Box<aya::maps::MapError>,
    },
    #[error("pinned state {}: {message}", path.display())]
    Pin { path: PathBuf, message: String },
    #[error("API: {context}: {message}")]
    Api { context: String, message: String },
    #[error("wireguard: {context}: {message}")]
    Wireguard { context: String, message: String },
    #[error("{0}")]
    Unsupported(String),
}

impl Error {
    /// True if the error means eBPF cannot be used on this machine (the object does not load or
    /// verify, bpffs cannot be mounted, a program cannot attach), rather than bad input or
    /// incompatible pinned state.
    #[must_use]
    pub fn is_ebpf_unavailable(&self) -> bool {
        matches!(
            self,
            Self::Load(_) | Self::Program { .. } | Self::Bpffs { .. }
        )
    }

    pub(crate) fn config(
        path: &std::path::Path,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::Config {
            path: path.to_path_buf(),
            field: field.into(),
            message: message.into(),
        }
    }
}
