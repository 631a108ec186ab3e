//! Loading what the guest boots: the kernel (ELF vmlinux with or without a PVH note, or bzImage),
//! the initrd, and the kernel command line. Runs on the VMM thread at `InstanceStart`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use crate::memory::GuestMemoryMmap;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use super::regs::EntryMode;

/// bzImage `xloadflags` bit: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1;
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel image {0}")]
    OpenKernel(String, #[source] std::io::Error),
    #[error("{0} {1} is not a regular file")]
    NotAFile(&'static str, String),
    #[error("kernel image {0} is neither an ELF vmlinux nor a bzImage")]
    UnknownKernelFormat(String),
    #[error("cannot load kernel image {0}")]
    LoadKernel(String, #[source] linux_loader::loader::Error),
    #[error("kernel image {0} is a bzImage without a 64-bit entry point")]
    Not64Bit(String),
    #[error("cannot open initrd {0}")]
    OpenInitrd(String, #[source] std::io::Error),
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x} after the kernel")]
    InitrdTooLarge { path: String, size: u64, limit: u64 },
    #[error("cannot read initrd {0} into guest memory")]
    ReadInitrd(String, #[source] vm_memory::GuestMemoryError),
    #[error("kernel command line is {0} bytes, longer than the {max} allowed", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("cannot write boot data into guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// A kernel in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub entry: u64,
    pub mode: EntryMode,
    /// The bzImage setup header, to seed boot_params.
    pub setup_header: Option<setup_header>,
    /// First guest address past the kernel.
    pub end: u64,
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &str) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(path).map_err(|e| BootError::OpenKernel(path.into(), e))?;
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Err(BootError::NotAFile("kernel image", path.into()));
    }
    let mut magic = [0u8; 4];
    let is_elf = file.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
    let load_err = |e| BootError::LoadKernel(path.into(), e);
    if is_elf {
        let result =
            Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
        let (mode, entry) = match result.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => (EntryMode::Pvh, addr.0),
            _ => (EntryMode::Linux64, result.kernel_load.0),
        };
        return Ok(LoadedKernel {
            entry,
            mode,
            setup_header: None,
            end: result.kernel_end,
        });
    }
    let mut header_magic = [0u8; 4];
    let is_bzimage = file.seek(SeekFrom::Start(0x202)).is_ok()
        && file.read_exact(&mut header_magic).is_ok()
        && header_magic == *b"HdrS";
    if !is_bzimage {
        return Err(BootError::UnknownKernelFormat(path.into()));
    }
    let result =
        BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
    let header = result
        .setup_header
        .ok_or_else(|| BootError::UnknownKernelFormat(path.into()))?;
    if header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::Not64Bit(path.into()));
    }
    Ok(LoadedKernel {
        entry: result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
        mode: EntryMode::Linux64,
        setup_header: Some(header),
        end: result.kernel_end,
    })
}

/// Where an initrd of `size` bytes goes: page-aligned, as high as possible below `limit`, above
/// `kernel_end`. `None` when it does not fit.
pub fn initrd_address(size: u64, kernel_end: u64, limit: u64) -> Option<u64> {
    let addr = limit.checked_sub(size)? & !(PAGE_SIZE - 1);
    (addr >= kernel_end && size > 0).then_some(addr)
}

/// Loads the initrd at `path` below `limit` (end of low RAM); returns `(address, size)`.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &str,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let mut file = File::open(path).map_err(|e| BootError::OpenInitrd(path.into(), e))?;
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Err(BootError::NotAFile("initrd", path.into()));
    }
    let size = file
        .metadata()
        .map_err(|e| BootError::OpenInitrd(path.into(), e))?
        .len();
    let too_large = || BootError::InitrdTooLarge {
        path: path.into(),
        size,
        limit,
    };
    let addr = initrd_address(size, kernel_end, limit).ok_or_else(too_large)?;
    let len = usize::try_from(size).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|e| BootError::ReadInitrd(path.into(), e))?;
    Ok((addr, size))
}

/// Checks the command line and writes it, NUL-terminated, at [`CMDLINE_START`].
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(BootError::Memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    fn temp_file(name: &str, bytes: &[u8]) -> String {
        let path = std::env::temp_dir().join(format!("flick-boot-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        path.to_string_lossy().into_owned()
    }

    #[test]
    fn initrd_goes_to_top_of_memory_page_aligned() {
        assert_eq!(
            initrd_address(0x1800, 0x20_0000, 0x800_0000),
            Some(0x7ff_e000)
        );
    }

    #[test]
    fn initrd_overlapping_kernel_does_not_fit() {
        assert_eq!(initrd_address(0x7f0_0000, 0x20_0000, 0x800_0000), None);
        assert_eq!(initrd_address(0x900_0000, 0x20_0000, 0x800_0000), None);
    }

    #[test]
    fn garbage_kernel_is_reported_as_unknown_format() {
        let path = temp_file("garbage", &[0x42; 4096]);
        let err = load_kernel(&memory(16 << 20), &path).unwrap_err();
        assert!(matches!(err, BootError::UnknownKernelFormat(_)), "{err}");
    }

    #[test]
    fn truncated_elf_is_a_load_error() {
        let path = temp_file("truncated-elf", b"\x7fELF\x02\x01\x01");
        let err = load_kernel(&memory(16 << 20), &path).unwrap_err();
        assert!(matches!(err, BootError::LoadKernel(..)), "{err}");
    }

    #[test]
    fn missing_kernel_is_an_open_error() {
        let err = load_kernel(&memory(1 << 20), "/nonexistent/vmlinux").unwrap_err();
        assert!(matches!(err, BootError::OpenKernel(..)));
    }

    #[test]
    fn cmdline_is_written_nul_terminated() {
        let mem = memory(1 << 20);
        write_cmdline(&mem, "console=ttyS0").unwrap();
        let mut buf = [0u8; 14];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let mem = memory(1 << 20);
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            write_cmdline(&mem, &long),
            Err(BootError::CmdlineTooLong(_))
        ));
    }
}
