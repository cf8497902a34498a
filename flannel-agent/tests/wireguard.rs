//! The wireguard dataplane against a real `wireguard-go`: the device, its peers, adoption by a
//! restarted agent, recreation after the device is lost, and removal.
//!
//! Runs in a network namespace of its own (`fe-<pid>-wg`) and, like every node of the testbed, in
//! a mount namespace of its own with a private `/run/wireguard` (the userspace implementation's
//! socket path is fixed); nothing is created in the root network namespace. Needs root and
//! `wireguard-go` (`cargo xtask test` installs it).
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::SocketAddrV4,
    os::unix::{fs::MetadataExt as _, net::UnixStream},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use flannel_agent::{
    backend::wireguard::Key,
    config::WireguardConfig,
    dataplane::{
        SyncReport,
        wireguard::{DEVICE, Peer, WireguardDevice},
    },
    iface::Netlink,
};
use ipnet::Ipv4Net;
use nix::{
    mount::{MsFlags, mount},
    sched::{CloneFlags, setns, unshare},
};

/// A network namespace of this test, removed on drop (also when the test fails) with the
/// device and the `wireguard-go` in it.
struct Netns(String);

impl Netns {
    fn create() -> Self {
        flannel_tests::sweep_stale();
        let ns = Self(format!("fe-{}-wg", std::process::id()));
        ns.remove(); // left by a killed run with our pid
        run("ip", &["netns", "add", &ns.0]);
        ns
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }

    fn inode(&self) -> u64 {
        std::fs::metadata(self.path()).unwrap().ino()
    }

    fn remove(&self) {
        if !Path::new(&self.path()).exists() {
            return;
        }
        let ino = self.inode();
        // wireguard-go exits when its device is deleted, not with the namespace.
        let _ = Command::new("ip")
            .args(["-n", &self.0, "link", "del", DEVICE])
            .output();
        for pid in wireguard_go_in(ino) {
            if !exited(pid, Duration::from_secs(3)) {
                // Only a process of this test: it lives in this test's namespace.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.remove();
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `wireguard-go` processes in the network namespace with inode `ino`.
fn wireguard_go_in(ino: u64) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "wireguard-go")
                && std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == ino)
                && !is_zombie(*pid)
        })
        .collect()
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s[s.rfind(')')? + 2..].starts_with('Z')))
        .unwrap_or(true)
}

/// Waits up to `timeout` for `pid` to exit.
fn exited(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Runs `f` on a thread in network namespace `ns`, with a mount namespace of its own whose
/// `/run/wireguard` is a private tmpfs, on a current-thread tokio runtime.
fn in_netns<T: Send>(ns: &Netns, f: impl AsyncFnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let fd = std::fs::File::open(ns.path()).unwrap();
            setns(&fd, CloneFlags::CLONE_NEWNET).unwrap();
            unshare(CloneFlags::CLONE_NEWNS).unwrap();
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .unwrap();
            std::fs::create_dir_all("/run/wireguard").unwrap();
            mount(
                Some("fe-wg-test"),
                "/run/wireguard",
                Some("tmpfs"),
                MsFlags::empty(),
                Some("mode=0700"),
            )
            .unwrap();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        })
        .join()
        .unwrap()
    })
}

/// What the device reports: listen port, private key, and public key → (endpoint, allowed IPs,
/// preshared key, keepalive).
#[derive(Debug, Default)]
struct Device {
    listen_port: u16,
    private_key: String,
    peers: BTreeMap<String, (String, BTreeSet<String>, String, u16)>,
}

/// `get` on the device's configuration socket (a client independent of the agent's).
fn get() -> Device {
    let mut sock = UnixStream::connect(format!("/var/run/wireguard/{DEVICE}.sock")).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock.write_all(b"get=1\n\n").unwrap();
    let mut text = String::new();
    let mut buf = [0; 4096];
    while !text.ends_with("\n\n") {
        let n = sock.read(&mut buf).unwrap();
        assert!(n > 0, "truncated response: {text:?}");
        text.push_str(std::str::from_utf8(&buf[..n]).unwrap());
    }
    assert!(text.ends_with("errno=0\n\n"), "{text}");
    let mut dev = Device::default();
    let mut peer = None;
    for (k, v) in text.lines().filter_map(|l| l.split_once('=')) {
        match k {
            "listen_port" => dev.listen_port = v.parse().unwrap(),
            "private_key" => dev.private_key = v.into(),
            "public_key" => {
                dev.peers.insert(v.into(), Default::default());
                peer = Some(v.to_string());
            }
            _ => {
                let Some(p) = dev.peers.get_mut(peer.as_deref().unwrap_or_default()) else {
                    continue;
                };
                match k {
                    "endpoint" => p.0 = v.into(),
                    "allowed_ip" => {
                        p.1.insert(v.into());
                    }
                    "preshared_key" => p.2 = v.into(),
                    "persistent_keepalive_interval" => p.3 = v.parse().unwrap(),
                    _ => {}
                }
            }
        }
    }
    dev
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn peer(key: Key, endpoint: &str) -> Peer {
    Peer {
        public_key: key,
        endpoint: endpoint.parse::<SocketAddrV4>().unwrap(),
    }
}

/// A peer as [`get`] reports it, with the test's PSK and keepalive.
fn device_peer(endpoint: &str, subnet: &str, psk: &Key) -> (String, BTreeSet<String>, String, u16) {
    (
        endpoint.into(),
        BTreeSet::from([subnet.into()]),
        psk.to_hex(),
        25,
    )
}

/// The link as `ensure` leaves it: MTU, up, the lease subnet's address as /32, the Network
/// routed onto it.
async fn assert_link(nl: &Netlink) {
    let link = nl.link_by_name(DEVICE).await.unwrap().unwrap();
    assert_eq!((link.mtu, link.up), (1420, true));
    let addrs = run("ip", &["-4", "-o", "addr", "show", "dev", DEVICE]);
    assert!(addrs.contains("inet 10.244.1.0/32"), "{addrs}");
    let routes = run("ip", &["-4", "route", "show", "dev", DEVICE]);
    assert!(
        routes.contains("10.244.0.0/16") && routes.contains("scope link"),
        "{routes}"
    );
}

#[test]
fn userspace_device_follows_the_peers() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "needs root (network namespaces)"
    );
    let ns = Netns::create();
    let ino = ns.inode();
    let key = Key::generate().unwrap();
    let psk = Key::generate().unwrap();
    let (k2, k3) = (
        Key::generate().unwrap().public(),
        Key::generate().unwrap().public(),
    );
    let cfg = WireguardConfig {
        listen_port: 51822,
        psk: Some(psk.to_base64()),
        persistent_keepalive: 25,
        mtu: 0,
        mode: "separate".into(),
    };
    in_netns(&ns, async || {
        let nl = Netlink::connect().unwrap();
        let (own, network) = (net("10.244.1.0/24"), net("10.244.0.0/16"));
        let mut dev = WireguardDevice::ensure(&nl, &cfg, &key, own, network, 1420)
            .await
            .unwrap();
        let pids = wireguard_go_in(ino);
        assert_eq!(pids.len(), 1, "one wireguard-go serves the device");
        assert_link(&nl).await;
        let d = get();
        assert_eq!(d.listen_port, 51822);
        assert_eq!(d.private_key, key.to_hex());
        assert!(d.peers.is_empty());

        // Two peers; the second's lease has no Port (flanneld < v0.26.6): our ListenPort.
        let two = BTreeMap::from([
            (net("10.244.2.0/24"), peer(k2, "198.18.0.12:51820")),
            (net("10.244.3.0/24"), peer(k3, "198.18.0.13:0")),
        ]);
        let report = dev.sync(&two).await.unwrap();
        assert_eq!(
            report,
            SyncReport {
                added: 2,
                ..SyncReport::default()
            }
        );
        let d = get();
        let expect = |endpoint, subnet| device_peer(endpoint, subnet, &psk);
        assert_eq!(
            d.peers,
            BTreeMap::from([
                (k2.to_hex(), expect("198.18.0.12:51820", "10.244.2.0/24")),
                (k3.to_hex(), expect("198.18.0.13:51822", "10.244.3.0/24")),
            ])
        );
        assert!(dev.sync(&two).await.unwrap().is_empty(), "idempotent");

        // One peer left, at a new endpoint.
        let one = BTreeMap::from([(net("10.244.2.0/24"), peer(k2, "198.18.0.22:51820"))]);
        let report = dev.sync(&one).await.unwrap();
        assert_eq!(
            report,
            SyncReport {
                added: 0,
                updated: 1,
                removed: 1
            }
        );
        assert_eq!(
            get().peers,
            BTreeMap::from([(k2.to_hex(), expect("198.18.0.22:51820", "10.244.2.0/24"))])
        );

        // A restarted agent adopts the running device: same process, peers kept.
        let mut dev = WireguardDevice::ensure(&nl, &cfg, &key, own, network, 1420)
            .await
            .unwrap();
        assert_eq!(wireguard_go_in(ino), pids, "adopted, not restarted");
        assert_eq!(get().peers.len(), 1);
        assert!(dev.sync(&one).await.unwrap().is_empty());

        // The device lost (link deleted, wireguard-go exits): the next sync recreates it.
        assert!(WireguardDevice::remove(&nl).await.unwrap());
        assert!(
            exited(pids[0], Duration::from_secs(5)),
            "wireguard-go exits with its device"
        );
        let report = dev.sync(&one).await.unwrap();
        assert_eq!(report.added, 1);
        let again = wireguard_go_in(ino);
        assert_eq!(again.len(), 1);
        assert_ne!(again, pids);
        let d = get();
        assert_eq!((d.listen_port, d.peers.len()), (51822, 1));
        assert_link(&nl).await;

        // --cleanup.
        assert!(WireguardDevice::remove(&nl).await.unwrap());
        assert!(
            exited(again[0], Duration::from_secs(5)),
            "wireguard-go exits with its device"
        );
        assert!(!WireguardDevice::remove(&nl).await.unwrap());
    });
    assert!(wireguard_go_in(ino).is_empty());
}
