//! The UFFD memory backend of snapshot loads, with Firecracker's protocol: guest RAM is fresh
//! anonymous memory registered with a userfaultfd for missing pages; flick connects to the page
//! server's unix socket and sends, in one message, the userfaultfd (`SCM_RIGHTS`) and a JSON list
//! of the regions: `base_host_virt_addr`, `size`, `offset` (where the region's contents start in
//! the memory file) and the page size in bytes (`page_size`, and the older `page_size_kib`, which
//! Firecracker also fills with bytes). The server answers every fault of the guest, of KVM or of
//! flick's devices with `UFFDIO_COPY`. flick keeps its copy of the descriptor and the connection
//! open for the VM's life, so the server sees the connection close when flick ends.
//! `examples/uffd_handler.rs` is such a server.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::memory::{GuestMemoryMmap, GuestRegionMmap};

const UFFD_API: u64 = 0xaa;
/// `_IOWR(0xaa, 0x3f, struct uffdio_api)`.
const UFFDIO_API: u64 = 0xc018_aa3f;
/// `_IOWR(0xaa, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const PAGE_SIZE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("cannot create a userfaultfd (a user without CAP_SYS_PTRACE needs vm.unprivileged_userfaultfd=1)")]
    Create(#[source] std::io::Error),
    #[error("the userfaultfd API handshake failed")]
    Api(#[source] std::io::Error),
    #[error("cannot register guest memory with the userfaultfd")]
    Register(#[source] std::io::Error),
    #[error("cannot map guest memory: {0}")]
    Map(String),
    #[error("cannot connect to the UFFD page server at {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("cannot send the userfaultfd to the page server at {0}")]
    Send(String, #[source] std::io::Error),
}

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

/// One region as the page server receives it.
#[derive(Debug, serde::Serialize)]
struct RegionMapping {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    page_size: usize,
    page_size_kib: usize,
}

fn ioctl<T>(fd: &File, request: u64, arg: &mut T) -> std::io::Result<()> {
    // SAFETY: `arg` is the structure `request` reads and writes, alive for the call; the
    // descriptor is a userfaultfd.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, std::ptr::from_mut(arg)) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// What keeps a UFFD-backed VM's memory served: the userfaultfd and the page server's connection.
#[derive(Debug)]
pub struct UffdBackend {
    _uffd: File,
    _server: UnixStream,
}

/// Guest RAM for the `ram` ranges as anonymous memory, every page of it missing until the page
/// server at `socket` provides it.
pub fn guest_memory(
    ram: &[(u64, u64)],
    socket: &str,
) -> Result<(GuestMemoryMmap, UffdBackend), UffdError> {
    let mut regions = Vec::with_capacity(ram.len());
    for &(start, size) in ram {
        let len =
            usize::try_from(size).map_err(|_| UffdError::Map("RAM range too large".into()))?;
        let region = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| UffdError::Map(e.to_string()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(start))
            .ok_or_else(|| UffdError::Map("region does not fit the guest address space".into()))?;
        regions.push(region);
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| UffdError::Map(e.to_string()))?;

    // SAFETY: userfaultfd takes only flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    let fd = i32::try_from(fd)
        .ok()
        .filter(|&fd| fd >= 0)
        .ok_or_else(|| UffdError::Create(std::io::Error::last_os_error()))?;
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let uffd = unsafe { File::from_raw_fd(fd) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    ioctl(&uffd, UFFDIO_API, &mut api).map_err(UffdError::Api)?;

    let mut mappings = Vec::with_capacity(ram.len());
    let mut offset = 0u64;
    for region in mem.iter() {
        let host = region.as_ptr() as u64;
        let mut register = UffdioRegister {
            start: host,
            len: region.len(),
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(&uffd, UFFDIO_REGISTER, &mut register).map_err(UffdError::Register)?;
        mappings.push(RegionMapping {
            base_host_virt_addr: host,
            size: region.len(),
            offset,
            page_size: PAGE_SIZE,
            page_size_kib: PAGE_SIZE,
        });
        offset += region.len();
    }

    let stream =
        UnixStream::connect(socket).map_err(|e| UffdError::Connect(socket.to_string(), e))?;
    let body = serde_json::to_vec(&mappings).unwrap_or_default();
    stream
        .send_with_fd(&body[..], uffd.as_raw_fd())
        .map_err(|e| UffdError::Send(socket.to_string(), std::io::Error::from(e)))?;
    Ok((
        mem,
        UffdBackend {
            _uffd: uffd,
            _server: stream,
        },
    ))
}
