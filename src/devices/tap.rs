//! A host TAP device opened with a virtio-net header (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`),
//! non-blocking, for the virtio-net device to read and write frames.
//!
//! The TAP is found by name through `/dev/net/tun` alone (`TUNSETIFF`), never through
//! `/sys/class/net`: inside a jail there is no `/sys`, and a process that joined a network
//! namespace after `/sys` was mounted sees the old namespace there.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// The TUN/TAP ioctl type (`'T'`).
const TUNTAP: std::os::raw::c_uint = 0x54;
vmm_sys_util::ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, std::os::raw::c_int);
vmm_sys_util::ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, std::os::raw::c_uint);
vmm_sys_util::ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, std::os::raw::c_int);
vmm_sys_util::ioctl_ior_nr!(TUNGETIFF, TUNTAP, 210, std::os::raw::c_uint);
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// Set in `TUNGETIFF`'s flags for a device that outlives its file descriptors (`ip tuntap add`).
const IFF_PERSIST: libc::c_short = 0x0800;
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
    #[error(
        "TAP device {0} does not exist or this user may not attach to it (create it with \
         `ip tuntap add {0} mode tap user <uid>` in flick's network namespace)"
    )]
    NotPermitted(String),
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    #[error("cannot attach to TAP device {0}")]
    Attach(String, #[source] std::io::Error),
    #[error("cannot configure TAP device {0}")]
    Configure(String, #[source] std::io::Error),
}

#[repr(C)]
#[derive(Debug)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    /// `name` must be shorter than 16 bytes.
    fn new(name: &str, flags: libc::c_short) -> IfReq {
        let mut req = IfReq {
            name: [0; 16],
            flags,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }
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
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq::new(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
        // SAFETY: TUNSETIFF reads and updates an ifreq-sized struct we own and that outlives the
        // call.
        let rc = unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut req) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy(name.into()),
                // Without CAP_NET_ADMIN the kernel says EPERM both for a missing device (it
                // would have to create one) and for one owned by another user.
                Some(libc::EPERM) => TapError::NotPermitted(name.into()),
                _ => TapError::Attach(name.into(), err),
            });
        }
        // With CAP_NET_ADMIN, TUNSETIFF on a name that does not exist creates a device that
        // lives only as long as this fd; an existing TAP that can be attached to is persistent
        // (one held by another process answers EBUSY above). Dropping the fd removes it again.
        let mut current = IfReq::new("", 0);
        // SAFETY: TUNGETIFF writes an ifreq-sized struct we own and that outlives the call.
        let rc = unsafe { ioctl_with_mut_ref(&file, TUNGETIFF(), &mut current) };
        if rc < 0 {
            return Err(TapError::Configure(
                name.into(),
                std::io::Error::last_os_error(),
            ));
        }
        if current.flags & IFF_PERSIST == 0 {
            return Err(TapError::Missing(name.into()));
        }
        const _: () = assert!(VNET_HDR_LEN == 12);
        let hdr_len: libc::c_int = 12;
        // SAFETY: TUNSETVNETHDRSZ reads one int we own.
        let rc = unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ(), &hdr_len) };
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
        let rc = unsafe { ioctl_with_val(&self.file, TUNSETOFFLOAD(), libc::c_ulong::from(flags)) };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // From <linux/if_tun.h>: _IOW('T', 202, int), _IOW('T', 208, unsigned int),
        // _IOW('T', 216, int).
        assert_eq!(TUNSETIFF(), 0x4004_54ca);
        assert_eq!(TUNSETOFFLOAD(), 0x4004_54d0);
        assert_eq!(TUNSETVNETHDRSZ(), 0x4004_54d8);
        // _IOR('T', 210, unsigned int)
        assert_eq!(TUNGETIFF(), 0x8004_54d2);
    }
}
