//! The static subnet manager: leases listed in a file, in flannel's lease format:
//! `{"leases":[{"Subnet":"10.244.1.0/24","PublicIP":"198.18.0.11","BackendType":"vxlan",
//! "BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"}}]}`.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use serde_json::Value;

use futures::future::LocalBoxFuture;

use super::{Join, Joined, Lease, LeaseSource};
use crate::{Error, cli::Args, config::NetConf, json::field};

/// Leases from a file (`--subnet-mgr static --leases FILE`); the network configuration from
/// net-conf.json.
pub struct StaticSource {
    leases: PathBuf,
    net_config: PathBuf,
}

impl StaticSource {
    pub fn new(args: &Args) -> Result<Self, Error> {
        let leases = args
            .leases
            .clone()
            .ok_or_else(|| Error::Unsupported("--subnet-mgr static needs --leases FILE".into()))?;
        Ok(Self {
            leases,
            net_config: args.net_config_path.clone(),
        })
    }
}

impl LeaseSource for StaticSource {
    fn name(&self) -> PathBuf {
        self.leases.clone()
    }

    fn config_name(&self) -> String {
        self.net_config.display().to_string()
    }

    fn network_config(&self) -> LocalBoxFuture<'_, Result<NetConf, Error>> {
        Box::pin(std::future::ready(crate::config::load(&self.net_config)))
    }

    fn join<'a>(&'a mut self, join: Join<'a>) -> LocalBoxFuture<'a, Result<Joined, Error>> {
        Box::pin(async move {
            let (tx, leases) = tokio::sync::watch::channel(read(&self.leases, join.netconf)?);
            follow(self.leases.clone(), join.netconf.clone(), tx);
            Ok(Joined {
                public_ip: join.public_ip,
                lease_ip: join.public_ip,
                leases,
            })
        })
    }
}

/// Follows the lease file (polled once a second by modification time, size and inode): sends the
/// validated lease set whenever the file changes; a broken file is reported and the last good
/// set kept.
pub fn follow(path: PathBuf, netconf: NetConf, tx: tokio::sync::watch::Sender<Vec<Lease>>) {
    tokio::spawn(async move {
        let mut seen = fingerprint(&path);
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        while !tx.is_closed() {
            tick.tick().await;
            let now = fingerprint(&path);
            if now == seen {
                continue;
            }
            seen = now;
            match read(&path, &netconf) {
                Ok(leases) => {
                    tx.send_if_modified(|cur| {
                        let changed = *cur != leases;
                        *cur = leases;
                        changed
                    });
                }
                Err(e) => {
                    crate::metrics::source_error("file");
                    tracing::warn!("{e}; keeping the current leases");
                }
            }
        }
    });
}

/// Identity of the file's current version (modification time, size, inode).
fn fingerprint(path: &Path) -> Option<(std::time::SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Reads and validates the lease file against the network configuration.
pub fn read(path: &Path, netconf: &NetConf) -> Result<Vec<Lease>, Error> {
    let text = crate::file::read_to_string(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })?;
    parse(path, &text, netconf)
}

/// Parses the text of a lease file (`path` only names it in errors).
pub fn parse(path: &Path, text: &str, netconf: &NetConf) -> Result<Vec<Lease>, Error> {
    let value: Value = serde_json::from_str(text).map_err(|source| Error::Json {
        path: path.into(),
        source,
    })?;
    let list = value
        .as_object()
        .and_then(|o| field(o, "leases"))
        .and_then(Value::as_array)
        .ok_or_else(|| Error::config(path, "leases", "expected {\"leases\": [ … ]}"))?;
    let mut leases = Vec::with_capacity(list.len());
    let mut by_ip = HashMap::new();
    let mut by_subnet = HashMap::new();
    for (i, item) in list.iter().enumerate() {
        let at = |name: &str| format!("leases[{i}].{name}");
        let obj = item
            .as_object()
            .ok_or_else(|| Error::config(path, format!("leases[{i}]"), "expected an object"))?;
        let text_of = |name: &str| -> Result<&str, Error> {
            field(obj, name)
                .ok_or_else(|| Error::config(path, at(name), "missing"))?
                .as_str()
                .ok_or_else(|| Error::config(path, at(name), "expected a string"))
        };
        let subnet: Ipv4Net = text_of("Subnet")?
            .parse()
            .map_err(|e| Error::config(path, at("Subnet"), format!("not an IPv4 CIDR: {e}")))?;
        if subnet != subnet.trunc() {
            return Err(Error::config(
                path,
                at("Subnet"),
                format!("{subnet} has host bits set"),
            ));
        }
        if !netconf.network.contains(&subnet) {
            return Err(Error::config(
                path,
                at("Subnet"),
                format!("{subnet} is outside the Network {}", netconf.network),
            ));
        }
        if subnet.prefix_len() != netconf.subnet_len {
            return Err(Error::config(
                path,
                at("Subnet"),
                format!("{subnet} is not a /{} (SubnetLen)", netconf.subnet_len),
            ));
        }
        let public_ip = text_of("PublicIP")?
            .parse()
            .map_err(|_| Error::config(path, at("PublicIP"), "not an IPv4 address"))?;
        let backend_type = match field(obj, "BackendType") {
            None => String::new(),
            Some(v) => v
                .as_str()
                .ok_or_else(|| Error::config(path, at("BackendType"), "expected a string"))?
                .to_string(),
        };
        let backend_data = field(obj, "BackendData").cloned().unwrap_or(Value::Null);
        // Every subnet is a /SubnetLen (checked above): two overlap only if they are equal, so
        // one hash lookup each keeps 70,000 leases linear.
        if let Some(&j) = by_subnet.get(&subnet) {
            let other: &Lease = &leases[j];
            return Err(Error::config(
                path,
                at("Subnet"),
                format!(
                    "{subnet} overlaps the lease of {} ({})",
                    other.public_ip, other.subnet
                ),
            ));
        }
        by_subnet.insert(subnet, i);
        if let Some(j) = by_ip.insert(public_ip, i) {
            return Err(Error::config(
                path,
                at("PublicIP"),
                format!("{public_ip} already holds leases[{j}]"),
            ));
        }
        leases.push(Lease {
            subnet,
            public_ip,
            backend_type,
            backend_data,
        });
    }
    Ok(leases)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn netconf() -> NetConf {
        config::parse(
            Path::new("n"),
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap()
    }

    #[test]
    fn reads_flannel_lease_format() {
        let text = r#"{"leases":[{"Subnet":"10.244.1.0/24","PublicIP":"198.18.0.11","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"}},
                       {"subnet":"10.244.2.0/24","publicIP":"198.18.0.12"}]}"#;
        let leases = parse(Path::new("l"), text, &netconf()).unwrap();
        assert_eq!(leases.len(), 2);
        assert_eq!(leases[0].subnet.to_string(), "10.244.1.0/24");
        assert_eq!(leases[0].backend_data["VtepMAC"], "aa:bb:cc:dd:ee:01");
        assert_eq!(leases[1].backend_type, "");
    }

    #[test]
    fn rejects_bad_leases_naming_the_field() {
        let cases = [
            (
                r#"{"leases":[{"Subnet":"10.245.1.0/24","PublicIP":"1.2.3.4"}]}"#,
                "leases[0].Subnet: 10.245.1.0/24 is outside the Network",
            ),
            (
                r#"{"leases":[{"Subnet":"10.244.1.0/25","PublicIP":"1.2.3.4"}]}"#,
                "is not a /24",
            ),
            (
                r#"{"leases":[{"Subnet":"10.244.1.0/24"}]}"#,
                "leases[0].PublicIP: missing",
            ),
            (
                r#"{"leases":[{"Subnet":"10.244.1.0/24","PublicIP":"1.2.3.4"},{"Subnet":"10.244.1.0/24","PublicIP":"1.2.3.5"}]}"#,
                "overlaps",
            ),
            (
                r#"{"leases":[{"Subnet":"10.244.1.0/24","PublicIP":"1.2.3.4"},{"Subnet":"10.244.2.0/24","PublicIP":"1.2.3.4"}]}"#,
                "already holds",
            ),
            (r#"{"nope":1}"#, "leases: expected"),
        ];
        for (text, want) in cases {
            let e = parse(Path::new("l"), text, &netconf())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e} should contain {want}");
        }
    }
}
