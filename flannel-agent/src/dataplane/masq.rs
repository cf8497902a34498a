//! The eBPF masquerade's host side: its settings, the ports the kernel is told to keep for it,
//! and the collector that expires masqueraded flows.
use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use flannel_ebpf_common::nat;
use tracing::{debug, info, warn};

use super::ebpf::{self, NatTimeouts};
use crate::Error;

/// `net.ipv4.ip_local_reserved_ports` of the agent's network namespace.
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
/// How often expired flows are collected.
pub const COLLECT_EVERY: Duration = Duration::from_secs(5);

/// What the eBPF masquerade needs to know (`--ip-masq` with the eBPF dataplane).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Masquerade {
    /// The address masqueraded flows get: the uplink's, as `MASQUERADE` would choose.
    pub addr: Ipv4Addr,
    /// Ports (and ICMP echo identifiers) to allocate, inclusive.
    pub ports: (u16, u16),
    /// flanneld's `--random-fully` (unless `--ip-masq-fully-random-disable`).
    pub fully_random: bool,
    pub timeouts: NatTimeouts,
}

impl Masquerade {
    /// `NodeConfig::nat_flags`.
    #[must_use]
    pub fn flags(&self) -> u32 {
        if self.fully_random {
            nat::FULLY_RANDOM
        } else {
            0
        }
    }
}

/// The range as `ip_local_reserved_ports` writes it.
fn token((lo, hi): (u16, u16)) -> String {
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}-{hi}")
    }
}

/// Adds `ports` to `net.ipv4.ip_local_reserved_ports` (keeping what is there), so that the
/// node's own connections are never given a port the masquerade allocates.
pub fn reserve_ports(ports: (u16, u16)) -> Result<(), Error> {
    reserve_ports_at(Path::new(RESERVED_PORTS), ports)
}

/// Removes exactly the range [`reserve_ports`] added (`--cleanup`); other entries stay.
pub fn release_ports(ports: (u16, u16)) -> Result<(), Error> {
    release_ports_at(Path::new(RESERVED_PORTS), ports)
}

fn sysctl_err(path: &Path, source: std::io::Error) -> Error {
    Error::NetlinkIo {
        context: format!("sysctl {}", path.display()),
        source,
    }
}

fn entries(path: &Path) -> Result<Vec<String>, Error> {
    let text = fs::read_to_string(path).map_err(|e| sysctl_err(path, e))?;
    Ok(text
        .trim()
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect())
}

fn reserve_ports_at(path: &Path, ports: (u16, u16)) -> Result<(), Error> {
    let mut list = entries(path)?;
    let ours = token(ports);
    if list.contains(&ours) {
        return Ok(());
    }
    list.push(ours);
    fs::write(path, list.join(",")).map_err(|e| sysctl_err(path, e))?;
    info!(ports = %token(ports), "reserved the masquerade ports (net.ipv4.ip_local_reserved_ports)");
    Ok(())
}

fn release_ports_at(path: &Path, ports: (u16, u16)) -> Result<(), Error> {
    let list = entries(path)?;
    let ours = token(ports);
    if !list.contains(&ours) {
        return Ok(());
    }
    let rest: Vec<String> = list.into_iter().filter(|t| *t != ours).collect();
    // An empty write is refused by some kernels; a newline clears the list.
    let text = if rest.is_empty() {
        "\n".to_string()
    } else {
        rest.join(",")
    };
    fs::write(path, text).map_err(|e| sysctl_err(path, e))?;
    info!(ports = %ours, "released the masquerade ports");
    Ok(())
}

/// Collects expired masqueraded flows from the pinned table under `pin_root` every
/// [`COLLECT_EVERY`], on a thread of its own (a large table is many system calls).
pub fn spawn_collector(pin_root: PathBuf, timeouts: NatTimeouts) {
    let spawned = std::thread::Builder::new()
        .name("nat-collector".into())
        .spawn(move || {
            loop {
                std::thread::sleep(COLLECT_EVERY);
                match ebpf::collect_nat(&pin_root, &timeouts, ebpf::monotonic_ns()) {
                    Ok(c) => {
                        crate::metrics::METRICS
                            .map_entries
                            .get_or_create(&crate::metrics::label("map", "nat"))
                            .set(i64::try_from(c.entries - c.removed).unwrap_or(i64::MAX));
                        if c.removed > 0 {
                            debug!(
                                entries = c.entries,
                                removed = c.removed,
                                "masquerade table collected"
                            );
                        }
                    }
                    Err(e) => warn!("collecting the masquerade table: {e}"),
                }
            }
        });
    if let Err(e) = spawned {
        warn!(
            "starting the masquerade table collector: {e}; expired flows stay until the table is cleaned up"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ports_are_merged_and_released_exactly() {
        let dir = flannel_tests::ScratchDir::new("masq");
        let f = dir.path().join("reserved");
        fs::write(&f, "8080,9000-9010\n").unwrap();
        reserve_ports_at(&f, (61000, 65535)).unwrap();
        assert_eq!(
            fs::read_to_string(&f).unwrap(),
            "8080,9000-9010,61000-65535"
        );
        reserve_ports_at(&f, (61000, 65535)).unwrap();
        assert_eq!(
            fs::read_to_string(&f).unwrap(),
            "8080,9000-9010,61000-65535"
        );
        release_ports_at(&f, (61000, 65535)).unwrap();
        assert_eq!(fs::read_to_string(&f).unwrap(), "8080,9000-9010");
        fs::write(&f, "\n").unwrap();
        reserve_ports_at(&f, (2000, 2000)).unwrap();
        assert_eq!(fs::read_to_string(&f).unwrap(), "2000");
        release_ports_at(&f, (2000, 2000)).unwrap();
        assert_eq!(fs::read_to_string(&f).unwrap(), "\n");
    }

    #[test]
    fn timeouts_follow_the_flow_state() {
        let t = NatTimeouts {
            tcp_established: Duration::from_hours(120),
            udp_replied: Duration::from_mins(2),
            other: Duration::from_secs(30),
        };
        assert_eq!(t.of(6, 0), Duration::from_mins(2));
        assert_eq!(t.of(6, nat::SEEN_REPLY), Duration::from_hours(120));
        assert_eq!(
            t.of(6, nat::SEEN_REPLY | nat::CLOSING),
            Duration::from_mins(2)
        );
        assert_eq!(
            t.of(6, nat::SEEN_REPLY | nat::RESET),
            Duration::from_secs(10)
        );
        assert_eq!(t.of(17, 0), Duration::from_secs(30));
        assert_eq!(t.of(17, nat::SEEN_REPLY), Duration::from_mins(2));
        assert_eq!(t.of(1, nat::SEEN_REPLY), Duration::from_secs(30));
    }
}
