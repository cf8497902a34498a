//! Internet checksums (RFC 1071, incremental update per RFC 1624).

/// Folds a 32-bit one's complement sum into 16 bits.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum of a 20-byte IPv4 header whose checksum field is zero.
#[inline(always)]
pub fn ipv4_header(hdr: &[u8; 20]) -> [u8; 2] {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 20 {
        sum += u32::from(u16::from_be_bytes([hdr[i], hdr[i + 1]]));
        i += 2;
    }
    (!fold(sum)).to_be_bytes()
}

/// True if a 20-byte IPv4 header (checksum included) sums to all ones.
#[inline(always)]
pub fn ipv4_header_ok(hdr: &[u8; 20]) -> bool {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 20 {
        sum += u32::from(u16::from_be_bytes([hdr[i], hdr[i + 1]]));
        i += 2;
    }
    fold(sum) == 0xffff
}

/// Updates checksum `check` for one 16-bit word changing from `old` to `new`: HC' = ~(~HC + ~m + m').
#[inline(always)]
pub fn replace16(check: [u8; 2], old: u16, new: u16) -> [u8; 2] {
    let hc = u16::from_be_bytes(check);
    let sum = u32::from(!hc) + u32::from(!old) + u32::from(new);
    (!fold(sum)).to_be_bytes()
}

/// Updates checksum `check` for a 4-byte field (an address) changing from `old` to `new`.
#[inline(always)]
pub fn replace32(check: [u8; 2], old: [u8; 4], new: [u8; 4]) -> [u8; 2] {
    let c = replace16(
        check,
        u16::from_be_bytes([old[0], old[1]]),
        u16::from_be_bytes([new[0], new[1]]),
    );
    replace16(
        c,
        u16::from_be_bytes([old[2], old[3]]),
        u16::from_be_bytes([new[2], new[3]]),
    )
}

/// True if two 16-bit one's complement values are equal (0x0000 and 0xffff are both zero).
#[inline(always)]
pub fn same16(a: u16, b: u16) -> bool {
    let zero = |x: u16| if x == 0xffff { 0 } else { x };
    zero(a) == zero(b)
}

/// The one's complement sum (not complemented) of the TCP/UDP pseudo-header: what a stack that
/// leaves the checksum to the device (`CHECKSUM_PARTIAL`) puts in the checksum field.
#[inline(always)]
pub fn pseudo_header(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: u16) -> u16 {
    let sum = u32::from(u16::from_be_bytes([src[0], src[1]]))
        + u32::from(u16::from_be_bytes([src[2], src[3]]))
        + u32::from(u16::from_be_bytes([dst[0], dst[1]]))
        + u32::from(u16::from_be_bytes([dst[2], dst[3]]))
        + u32::from(proto)
        + u32::from(l4_len);
    fold(sum)
}
