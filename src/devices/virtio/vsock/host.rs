//! The host side's unix sockets, all non-blocking: the listener on `uds_path`, connections to
//! `<uds_path>_<port>`, accepted streams, and sends and receives that never block or raise
//! SIGPIPE. Raw system calls (no `ioctl`), so the VMM thread's seccomp policy names each one.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Pending connections the listener queues.
const BACKLOG: i32 = 64;

fn sockaddr(path: &str) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or_default();
    let bytes = path.as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or empty",
        ));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    let len = libc::socklen_t::try_from(len).unwrap_or(libc::socklen_t::MAX);
    Ok((addr, len))
}

fn stream_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A listening socket bound at `path` (which must not exist).
pub fn listen(path: &str) -> io::Result<OwnedFd> {
    let (addr, len) = sockaddr(path)?;
    let fd = stream_socket()?;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes; the fd is ours.
    check(unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) })?;
    // SAFETY: plain system call on our fd.
    check(unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) })?;
    Ok(fd)
}

/// A connected stream to the listener at `path`. A listener whose queue is full refuses
/// (`WouldBlock`) instead of blocking the caller.
pub fn connect(path: &str) -> io::Result<OwnedFd> {
    let (addr, len) = sockaddr(path)?;
    let fd = stream_socket()?;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes; the fd is ours.
    check(unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), len) })?;
    Ok(fd)
}

/// The next connection waiting on `listener`, non-blocking.
pub fn accept(listener: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers are allowed; the result is checked.
    let fd = unsafe {
        libc::accept4(
            listener,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created by accept4 and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn size(ret: isize) -> io::Result<usize> {
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

/// Receives what is there, up to `buf.len()` bytes; `Ok(0)` at end of stream.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: writes at most `buf.len()` bytes into `buf`.
    size(unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) })
}

/// Sends as much of `buf` as fits now.
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    // SAFETY: reads at most `buf.len()` bytes from `buf`.
    size(unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), flags) })
}

/// Ends the sending direction (the peer reads end of stream).
pub fn shutdown_write(fd: RawFd) {
    // SAFETY: plain system call; failure (already closed) changes nothing.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_do_not_fit_an_address_are_refused() {
        assert!(sockaddr("").is_err());
        assert!(sockaddr(&"a".repeat(108)).is_err());
        assert!(sockaddr("a\0b").is_err());
        assert!(sockaddr(&"a".repeat(107)).is_ok());
    }

    #[test]
    fn listener_connect_accept_and_bytes_both_ways() {
        let dir = std::env::temp_dir().join(format!("flick-vsock-host-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        let path = dir.join("s").display().to_string();
        let _ = std::fs::remove_file(&path);
        let listener = listen(&path).unwrap();
        assert_eq!(
            accept(listener.as_raw_fd()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let client = connect(&path).unwrap();
        let server = accept(listener.as_raw_fd()).unwrap();
        assert_eq!(send(client.as_raw_fd(), b"ping").unwrap(), 4);
        let mut buf = [0u8; 8];
        assert_eq!(recv(server.as_raw_fd(), &mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], b"ping");
        assert_eq!(
            recv(server.as_raw_fd(), &mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        shutdown_write(client.as_raw_fd());
        assert_eq!(recv(server.as_raw_fd(), &mut buf).unwrap(), 0);
        assert!(connect(&format!("{path}_1")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
