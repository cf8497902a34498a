//! Reading the small files the agent is given (net-conf.json, lease files, kubeconfigs, keys,
//! certificates) without trusting what is at the path: a FIFO must not block the agent in
//! `open()` (it is opened non-blocking and refused), a device such as `/dev/zero` must not grow
//! the agent without bound (only regular files are read, and only up to a limit).
use std::{
    fs::File,
    io::{self, Read as _},
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
};

/// The largest file the agent reads: a lease file of 70,000 leases is about 10 MiB.
pub const MAX_LEN: u64 = 32 << 20;

/// Reads a regular file of at most [`MAX_LEN`] bytes.
///
/// # Errors
/// The open or read failed, the path is not a regular file (a FIFO, a device, a directory), or
/// the file is larger than [`MAX_LEN`].
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    read_at_most(path, MAX_LEN)
}

/// Reads a regular file as UTF-8 text, as [`read`].
///
/// # Errors
/// As [`read`], or the file is not UTF-8.
pub fn read_to_string(path: &Path) -> io::Result<String> {
    String::from_utf8(read(path)?).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Reads a regular file of at most `limit` bytes.
///
/// # Errors
/// As [`read`].
pub fn read_at_most(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    // O_NONBLOCK: opening a FIFO for reading does not wait for a writer; the type check below
    // then refuses it. Regular files ignore the flag.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a regular file ({})", kind(meta.file_type())),
        ));
    }
    if meta.len() > limit {
        return Err(too_large(limit));
    }
    let mut buf = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // The file may grow between the check and the read: never read more than the limit.
    File::take(file, limit + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Err(too_large(limit));
    }
    Ok(buf)
}

fn too_large(limit: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::FileTooLarge,
        format!("larger than {} MiB", limit >> 20),
    )
}

fn kind(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = flannel_tests::ScratchDir::new("file-fifo");
        let fifo = dir.path().join("net-conf.json");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // No writer: a blocking open would never return (the test would hang, not pass).
        let e = read(&fifo).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn devices_and_directories_are_refused() {
        for path in ["/dev/zero", "/dev/null", "/"] {
            let e = read(Path::new(path)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{path}");
        }
    }

    #[test]
    fn regular_files_are_read_up_to_the_limit() {
        let dir = flannel_tests::ScratchDir::new("file-limit");
        let f = dir.path().join("leases.json");
        std::fs::write(&f, b"0123456789").unwrap();
        assert_eq!(read_at_most(&f, 10).unwrap(), b"0123456789");
        assert_eq!(
            read_at_most(&f, 9).unwrap_err().kind(),
            io::ErrorKind::FileTooLarge
        );
        assert_eq!(read_to_string(&f).unwrap(), "0123456789");
    }
}
