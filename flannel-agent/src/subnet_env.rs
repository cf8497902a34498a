//! `/run/flannel/subnet.env`, read by the flannel CNI plugin, written as flanneld writes it
//! (pkg/subnet/subnet.go `WriteSubnetFile`): atomically, through a temporary file and a rename.
use std::{io::Write as _, net::Ipv4Addr, path::Path};

use ipnet::Ipv4Net;

use crate::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    pub network: Ipv4Net,
    /// This node's lease subnet.
    pub subnet: Ipv4Net,
    pub mtu: u32,
    pub ipmasq: bool,
}

impl SubnetEnv {
    /// The file's contents, byte for byte as flanneld writes them.
    #[must_use]
    pub fn render(&self) -> String {
        // FLANNEL_SUBNET is the subnet's first host address with the subnet's prefix length.
        let gateway = Ipv4Addr::from(u32::from(self.subnet.network()) + 1);
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network,
            gateway,
            self.subnet.prefix_len(),
            self.mtu,
            self.ipmasq
        )
    }

    /// Writes the file atomically, creating its directory if needed.
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        let tmp = temporary(path)?;
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(self.render().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(|source| subnet_file_err(path, source))
    }

    /// Checks, before anything is programmed, that [`Self::write`] will be able to write `path`:
    /// its directory exists or can be made, a file can be created in it, and `path` is not a
    /// directory. Nothing is left behind.
    pub fn prepare(path: &Path) -> Result<(), Error> {
        if path.is_dir() {
            return Err(subnet_file_err(
                path,
                std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory"),
            ));
        }
        let tmp = temporary(path)?;
        std::fs::File::create(&tmp).map_err(|source| subnet_file_err(path, source))?;
        std::fs::remove_file(&tmp).map_err(|source| subnet_file_err(path, source))
    }
}

fn subnet_file_err(path: &Path, source: std::io::Error) -> Error {
    Error::SubnetFile {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `path`'s directory if needed; returns the temporary file name the write goes through.
fn temporary(path: &Path) -> Result<std::path::PathBuf, Error> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|source| subnet_file_err(path, source))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(dir.join(format!(".{name}.{}", std::process::id())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_flanneld() {
        let env = SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.1.0/24".parse().unwrap(),
            mtu: 1450,
            ipmasq: true,
        };
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
    }

    #[test]
    fn writes_atomically_and_replaces() {
        let dir = flannel_tests::ScratchDir::new("subnet-env");
        let path = dir.path().join("run/flannel/subnet.env");
        let mut env = SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.1.0/24".parse().unwrap(),
            mtu: 1450,
            ipmasq: false,
        };
        env.write(&path).unwrap();
        env.mtu = 1400;
        env.write(&path).unwrap();
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("FLANNEL_MTU=1400\n")
        );
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    }

    #[test]
    fn prepare_finds_an_unwritable_path_and_leaves_nothing() {
        let scratch = flannel_tests::ScratchDir::new("subnet-prep");
        let dir = scratch.path();
        // A path component that is a file.
        let file = dir.join("run");
        std::fs::write(&file, "").unwrap();
        assert!(SubnetEnv::prepare(&file.join("subnet.env")).is_err());
        // The path is a directory.
        assert!(SubnetEnv::prepare(dir).is_err());
        // A good path: its directory is made, and nothing is left in it.
        let good = dir.join("flannel").join("subnet.env");
        SubnetEnv::prepare(&good).unwrap();
        assert_eq!(
            std::fs::read_dir(good.parent().unwrap()).unwrap().count(),
            0
        );
    }
}
