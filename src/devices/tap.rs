//! A host TAP device opened with a virtio-net header (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`),
//! non-blocking, for the virtio-net device to read and write frames.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// Offload flags for [`Tap::set_offload`].
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_UFO: u32 = 0x10;
/// Size of the virtio-net header (virtio 1.x, `virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP device {0} does not exist (create it first, e.g. `ip tuntap add {0} mode tap`)")]
    Missing(String),
    #[error("TAP device {0} is busy (already attached to another process)")]
    Busy(String),
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    #[error("cannot attach to TAP device {0}")]
    Attach(String, #[source] std::io::Error),
    #[error("cannot configure TAP device {0}")]
    Configure(String, #[source] std::io::Error),
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An attached TAP device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    pub name: String,
}

impl Tap {
    /// Attaches to the existing TAP device `name`.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= 16 || name.contains('/') {
            return Err(TapError::Missing(name.into()));
        }
        if !std::path::Path::new("/sys/class/net").join(name).exists() {
            return Err(TapError::Missing(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads an ifreq-sized struct we own and that outlives the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy(name.into()),
                _ => TapError::Attach(name.into(), err),
            });
        }
        const _: () = assert!(VNET_HDR_LEN == 12);
        let hdr_len: libc::c_int = 12;
        // SAFETY: TUNSETVNETHDRSZ reads one int we own.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                TUNSETVNETHDRSZ,
                &hdr_len as *const libc::c_int,
            )
        };
        if rc < 0 {
            return Err(TapError::Configure(
                name.into(),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Tap {
            file,
            name: name.into(),
        })
    }

    /// Tells the TAP which offloads the guest accepts (frames it may receive unsegmented or
    /// without checksums).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if rc < 0 {
            return Err(TapError::Configure(
                self.name.clone(),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Reads one frame (with its virtio-net header).
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame (with its virtio-net header).
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
