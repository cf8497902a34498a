//! Backends (flannel's `pkg/backend`): what each puts in its lease and how much MTU it costs.
pub mod vxlan;

/// A MAC address as flannel prints it in leases (`aa:bb:cc:dd:ee:ff`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut mac = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in &mut mac {
            let part = parts
                .next()
                .ok_or_else(|| format!("{s:?} is not a MAC address"))?;
            if part.len() != 2 {
                return Err(format!("{s:?} is not a MAC address"));
            }
            *byte =
                u8::from_str_radix(part, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
        }
        if parts.next().is_some() {
            return Err(format!("{s:?} is not a MAC address"));
        }
        Ok(Self(mac))
    }
}
