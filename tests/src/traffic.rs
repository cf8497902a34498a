//! Small traffic generators for the benchmark, each bounded in time: TCP request/response
//! latency (`TCP_RR` style), connection rate (`TCP_CRR` style) and small-packet UDP rate. Both ends
//! run on threads that entered the ends' network namespaces.
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    reason = "measurement arithmetic on counts and durations far below 2^52"
)]
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};

use crate::with_netns;

/// One end of a measurement: a network namespace and the address it is reached at.
#[derive(Debug, Clone)]
pub struct End {
    pub netns: String,
    pub ip: Ipv4Addr,
}

fn port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    41_000 + (NEXT.fetch_add(1, Ordering::Relaxed) % 9_000) as u16
}

/// Request/response latency: `size`-byte ping-pong over one TCP connection for `seconds`.
#[derive(Debug, Clone, Copy)]
pub struct Rr {
    pub p50_us: f64,
    pub p99_us: f64,
    pub per_s: f64,
}

pub fn tcp_rr(from: &End, to: &End, seconds: f64, size: usize) -> Result<Rr> {
    let addr = SocketAddr::from((to.ip, port()));
    let listener = with_netns(&to.netns, move || Ok(TcpListener::bind(addr)?))?;
    let server = thread::spawn(move || -> Result<()> {
        let (mut c, _) = listener.accept()?;
        c.set_nodelay(true)?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = vec![0u8; size];
        loop {
            match c.read_exact(&mut buf) {
                Ok(()) => c.write_all(&buf)?,
                Err(_) => return Ok(()),
            }
        }
    });
    let mut c = with_netns(&from.netns, move || {
        Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(5))?)
    })
    .with_context(|| format!("TCP_RR connect to {addr}"))?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    let msg = vec![0x5au8; size];
    let mut buf = vec![0u8; size];
    let mut lat = Vec::new();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        c.write_all(&msg)?;
        c.read_exact(&mut buf)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let elapsed = start.elapsed().as_secs_f64();
    drop(c);
    server.join().map_err(|_| anyhow!("RR server panicked"))??;
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    Ok(Rr {
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        per_s: lat.len() as f64 / elapsed,
    })
}

/// `setsockopt(level, name, value)` on a socket (`value`'s bytes: a C value, or a buffer).
pub fn set_sock_opt<T: ?Sized>(
    sock: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> std::io::Result<()> {
    // SAFETY: a valid socket, and a value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            size_of_val(value) as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Makes a blocking `accept` on `listener` give up after `timeout` (`SO_RCVTIMEO`, which Linux
/// applies to `accept`).
fn accept_timeout(listener: &TcpListener, timeout: Duration) -> Result<()> {
    // The field types are not named: libc deprecates musl's `time_t` and `suseconds_t` aliases.
    let tv = libc::timeval {
        tv_sec: timeout.as_secs().try_into().context("accept timeout")?,
        tv_usec: timeout.subsec_micros().into(),
    };
    set_sock_opt(listener, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv).context("SO_RCVTIMEO")
}

/// Connections per second: connect, 1-byte request, 1-byte answer, close, for `seconds`.
pub fn tcp_crr(from: &End, to: &End, seconds: f64) -> Result<f64> {
    let addr = SocketAddr::from((to.ip, port()));
    let listener = with_netns(&to.netns, move || Ok(TcpListener::bind(addr)?))?;
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    // A blocking accept, woken by the next connection: a non-blocking accept polled between
    // sleeps would add a timer's latency (the sleep plus the timer slack, ~100 µs here) to most
    // connections and measure that instead of the path. The timeout only bounds how long the
    // server outlives the client.
    accept_timeout(&listener, Duration::from_millis(100))?;
    let server = thread::spawn(move || {
        while !st.load(Ordering::Relaxed) {
            if let Ok((mut c, _)) = listener.accept() {
                c.set_read_timeout(Some(Duration::from_secs(2))).ok();
                let mut b = [0u8; 1];
                if c.read_exact(&mut b).is_ok() {
                    let _ = c.write_all(&b);
                }
            }
        }
    });
    let from_ns = from.netns.clone();
    let done = with_netns(&from_ns, move || {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed().as_secs_f64() < seconds {
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            c.set_read_timeout(Some(Duration::from_secs(2)))?;
            c.write_all(&[1])?;
            let mut b = [0u8; 1];
            c.read_exact(&mut b)?;
            n += 1;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    });
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    done
}

/// How the UDP receiver waits for the next datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpReceiver {
    /// A blocking `recv`: whenever the receiver has drained its socket and sleeps, the next
    /// datagram's delivery wakes it, on the sender's CPU (an IPI in a VM). That cost is the same
    /// for every path and compresses their ratios towards 1.
    Blocking,
    /// A non-blocking `recv` in a loop: the receiver never sleeps, so delivery never wakes
    /// anyone and the sender's CPU spends its time on the sending and the datapath only.
    Polling,
}

/// Small-packet UDP: `size`-byte datagrams sent as fast as one thread can for `seconds`;
/// returns the packets per second received.
pub fn udp_pps(
    from: &End,
    to: &End,
    seconds: f64,
    size: usize,
    waiting: UdpReceiver,
) -> Result<f64> {
    let addr = SocketAddr::from((to.ip, port()));
    let sock = with_netns(&to.netns, move || Ok(UdpSocket::bind(addr)?))?;
    match waiting {
        UdpReceiver::Blocking => sock.set_read_timeout(Some(Duration::from_millis(200)))?,
        UdpReceiver::Polling => sock.set_nonblocking(true)?,
    }
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (r, st) = (received.clone(), stop.clone());
    let counter = thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !st.load(Ordering::Relaxed) {
            if sock.recv(&mut buf).is_ok() {
                r.fetch_add(1, Ordering::Relaxed);
            } else if waiting == UdpReceiver::Polling {
                std::hint::spin_loop();
            }
        }
    });
    let from_ns = from.netns.clone();
    let sent = with_netns(&from_ns, move || {
        let s = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))?;
        s.connect(addr)?;
        let msg = vec![0u8; size];
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed().as_secs_f64() < seconds {
            for _ in 0..64 {
                if s.send(&msg).is_ok() {
                    n += 1;
                }
            }
        }
        Ok((n, start.elapsed().as_secs_f64()))
    });
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let _ = counter.join();
    let (_, elapsed) = sent?;
    Ok(received.load(Ordering::Relaxed) as f64 / elapsed)
}

/// Busy and total jiffies of all CPUs (`/proc/stat`).
pub fn cpu_jiffies() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .next()
        .ok_or_else(|| anyhow!("empty /proc/stat"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}
