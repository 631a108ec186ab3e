//! An example UFFD page server for flick's (and Firecracker's) `Uffd` memory backend:
//!
//!   cargo run --example uffd_handler -- SOCKET MEMORY_FILE
//!
//! Binds SOCKET, accepts one connection, receives the userfaultfd and the JSON list of guest
//! memory regions (`base_host_virt_addr`, `size`, `offset`, `page_size`), maps MEMORY_FILE (a
//! snapshot's memory file) and answers each missing-page fault with `UFFDIO_COPY` of that page
//! from the file, until the VMM closes the connection. Then load the snapshot with
//! `PUT /snapshot/load {"snapshot_path": ..., "mem_backend": {"backend_type": "Uffd",
//! "backend_path": SOCKET}}`. A real server would add its own policy here: prefetching,
//! pages from the network, sharing between clones.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// `_IOWR(0xaa, 0x03, struct uffdio_copy)`.
const UFFDIO_COPY: u64 = 0xc028_aa03;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[derive(Debug, serde::Deserialize)]
pub struct Region {
    pub base_host_virt_addr: u64,
    pub size: u64,
    pub offset: u64,
    pub page_size: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// Receives the userfaultfd and the regions from the VMM on `stream`.
pub fn receive(stream: &UnixStream) -> io::Result<(File, Vec<Region>)> {
    let mut buf = vec![0u8; 64 << 10];
    let (n, uffd) = stream.recv_with_fd(&mut buf).map_err(io::Error::from)?;
    let uffd = uffd.ok_or_else(|| io::Error::other("the message carried no userfaultfd"))?;
    let regions: Vec<Region> =
        serde_json::from_slice(&buf[..n]).map_err(|e| io::Error::other(e.to_string()))?;
    Ok((uffd, regions))
}

/// Serves the faults of `uffd` for `regions` from `mem` (a memory file) until `stream` closes;
/// returns the number of pages copied.
pub fn serve(stream: &UnixStream, uffd: &File, regions: &[Region], mem: &File) -> io::Result<u64> {
    let len = usize::try_from(mem.metadata()?.len()).map_err(io::Error::other)?;
    // SAFETY: a fresh read-only private mapping of the whole file, unmapped below.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            mem.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let result = serve_mapped(stream, uffd, regions, base as u64, len as u64);
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(base, len) };
    result
}

fn serve_mapped(
    stream: &UnixStream,
    uffd: &File,
    regions: &[Region],
    file_base: u64,
    file_len: u64,
) -> io::Result<u64> {
    let mut served = 0u64;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfd entries.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            // The VMM closed the connection: it has ended.
            return Ok(served);
        }
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        let mut msg = [0u8; 32];
        // SAFETY: reads at most 32 bytes, one struct uffd_msg, into `msg`.
        let n = unsafe { libc::read(uffd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
        if n != 32 {
            continue; // EAGAIN: another reader or a spurious wakeup
        }
        if msg[0] != UFFD_EVENT_PAGEFAULT {
            continue;
        }
        let address = u64::from_le_bytes(msg[16..24].try_into().unwrap_or_default());
        let region = regions
            .iter()
            .find(|r| address >= r.base_host_virt_addr && address < r.base_host_virt_addr + r.size)
            .ok_or_else(|| {
                io::Error::other(format!("fault at {address:#x} outside guest memory"))
            })?;
        let page = region.page_size.max(4096);
        let dst = address & !(page - 1);
        let at = region.offset + (dst - region.base_host_virt_addr);
        if at + page > file_len {
            return Err(io::Error::other(format!(
                "page at file offset {at:#x} beyond the file"
            )));
        }
        let mut copy = UffdioCopy {
            dst,
            src: file_base + at,
            len: page,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY with a valid uffdio_copy structure; the source is our mapping.
        let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY as _, &mut copy) };
        if rc == 0 {
            served += 1;
        } else if io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
            // EEXIST: another fault on the same page was answered first.
            return Err(io::Error::last_os_error());
        }
    }
}

#[allow(dead_code)]
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, socket, mem] = args.as_slice() else {
        eprintln!("usage: uffd_handler SOCKET MEMORY_FILE");
        std::process::exit(2);
    };
    let run = || -> io::Result<u64> {
        let mem = File::open(mem)?;
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        let (stream, _) = listener.accept()?;
        let (uffd, regions) = receive(&stream)?;
        serve(&stream, &uffd, &regions, &mem)
    };
    match run() {
        Ok(pages) => eprintln!("uffd_handler: served {pages} pages"),
        Err(e) => {
            eprintln!("uffd_handler: error: {e}");
            std::process::exit(1);
        }
    }
}
