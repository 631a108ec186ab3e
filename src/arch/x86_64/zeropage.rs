//! Boot information handed to the guest: Linux `boot_params` (the "zero page") for the 64-bit and
//! bzImage protocols, and `hvm_start_info` for the PVH protocol. Pure data: the caller writes the
//! results into guest memory.
//!
//! Narrowing casts here are exact: boot_params fields are filled from the memory layout and a command line bounded by CMDLINE_MAX_SIZE.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use super::layout::{EBDA_START, HIMEM_START};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const PVH_START_INFO_MAGIC: u32 = 0x336e_c578;

/// One memory-map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The guest memory map for RAM ranges `(start, size)` laid out by [`super::layout::ram_ranges`].
pub fn memory_map(ram: &[(u64, u64)]) -> Vec<MemoryMapEntry> {
    let mut map = Vec::new();
    for &(start, size) in ram {
        let end = start + size;
        if start < HIMEM_START {
            // Low memory: usable up to the EBDA, then high memory from 1 MiB.
            map.push(MemoryMapEntry {
                addr: start,
                size: EBDA_START - start,
                kind: E820_RAM,
            });
            map.push(MemoryMapEntry {
                addr: EBDA_START,
                size: 0x10_0000 - EBDA_START,
                kind: E820_RESERVED,
            });
            if end > HIMEM_START {
                map.push(MemoryMapEntry {
                    addr: HIMEM_START,
                    size: end - HIMEM_START,
                    kind: E820_RAM,
                });
            }
        } else {
            map.push(MemoryMapEntry {
                addr: start,
                size,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// Where the command line and initrd are, for the boot structures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootInfo {
    pub cmdline_addr: u64,
    /// Length of the command line without its terminating NUL.
    pub cmdline_len: usize,
    /// `(address, size)` of the initrd, if any.
    pub initrd: Option<(u64, u64)>,
}

/// Builds Linux's `boot_params`. `header` is the bzImage's setup header, if the kernel had one.
pub fn linux_boot_params(
    header: Option<setup_header>,
    info: &BootInfo,
    map: &[MemoryMapEntry],
) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = info.cmdline_addr as u32;
    params.hdr.cmdline_size = info.cmdline_len as u32;
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let count = map.len().min(params.e820_table.len());
    for (slot, entry) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = count as u8;
    params
}

/// The PVH boot structures as bytes: `hvm_start_info` (at `info_addr`), the module list (at
/// `modlist_addr`, only when an initrd exists) and the memory map (at `memmap_addr`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvhBlobs {
    pub start_info: Vec<u8>,
    pub modlist: Vec<u8>,
    pub memmap: Vec<u8>,
}

/// Builds the PVH start info (version 1) pointing at the given module list and memory map.
pub fn pvh_start_info(
    info: &BootInfo,
    map: &[MemoryMapEntry],
    modlist_addr: u64,
    memmap_addr: u64,
) -> PvhBlobs {
    let mut start_info = Vec::with_capacity(56);
    start_info.extend_from_slice(&PVH_START_INFO_MAGIC.to_le_bytes());
    start_info.extend_from_slice(&1u32.to_le_bytes()); // version
    start_info.extend_from_slice(&0u32.to_le_bytes()); // flags
    let nr_modules = u32::from(info.initrd.is_some());
    start_info.extend_from_slice(&nr_modules.to_le_bytes());
    let modlist_paddr = if info.initrd.is_some() {
        modlist_addr
    } else {
        0
    };
    start_info.extend_from_slice(&modlist_paddr.to_le_bytes());
    start_info.extend_from_slice(&info.cmdline_addr.to_le_bytes());
    start_info.extend_from_slice(&0u64.to_le_bytes()); // rsdp_paddr
    start_info.extend_from_slice(&memmap_addr.to_le_bytes());
    start_info.extend_from_slice(&(map.len() as u32).to_le_bytes());
    start_info.extend_from_slice(&0u32.to_le_bytes());

    let mut modlist = Vec::new();
    if let Some((addr, size)) = info.initrd {
        for field in [addr, size, 0, 0] {
            modlist.extend_from_slice(&field.to_le_bytes());
        }
    }
    let mut memmap = Vec::with_capacity(map.len() * 24);
    for entry in map {
        memmap.extend_from_slice(&entry.addr.to_le_bytes());
        memmap.extend_from_slice(&entry.size.to_le_bytes());
        memmap.extend_from_slice(&entry.kind.to_le_bytes());
        memmap.extend_from_slice(&0u32.to_le_bytes());
    }
    PvhBlobs {
        start_info,
        modlist,
        memmap,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::ram_ranges;

    #[test]
    fn memory_map_skips_legacy_hole_and_mmio_gap() {
        let map = memory_map(&ram_ranges(4 << 30));
        let ram: Vec<_> = map.iter().filter(|e| e.kind == E820_RAM).collect();
        assert_eq!(ram[0].addr, 0);
        assert_eq!(ram[0].size, EBDA_START);
        assert_eq!(ram[1].addr, HIMEM_START);
        assert_eq!(ram[1].addr + ram[1].size, 0xc000_0000);
        assert_eq!(ram[2].addr, 1 << 32);
        let usable: u64 = ram.iter().map(|e| e.size).sum();
        assert_eq!(usable, (4 << 30) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn boot_params_carry_cmdline_initrd_and_e820() {
        let info = BootInfo {
            cmdline_addr: 0x20000,
            cmdline_len: 10,
            initrd: Some((0x700_0000, 0x1000)),
        };
        let map = memory_map(&ram_ranges(128 << 20));
        let params = linux_boot_params(None, &info, &map);
        assert_eq!({ params.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ params.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ params.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!(params.e820_entries as usize, map.len());
        assert_eq!({ params.e820_table[2].addr }, HIMEM_START);
    }

    #[test]
    fn pvh_start_info_has_magic_and_points_at_memmap() {
        let info = BootInfo {
            cmdline_addr: 0x20000,
            cmdline_len: 3,
            initrd: None,
        };
        let map = memory_map(&ram_ranges(64 << 20));
        let blobs = pvh_start_info(&info, &map, 0x6040, 0x7000);
        assert_eq!(blobs.start_info.len(), 56);
        assert_eq!(&blobs.start_info[0..4], &PVH_START_INFO_MAGIC.to_le_bytes());
        assert_eq!(&blobs.start_info[24..32], &0x20000u64.to_le_bytes());
        assert_eq!(&blobs.start_info[40..48], &0x7000u64.to_le_bytes());
        assert_eq!(&blobs.start_info[48..52], &(map.len() as u32).to_le_bytes());
        assert_eq!(blobs.memmap.len(), map.len() * 24);
        assert!(blobs.modlist.is_empty());
    }
}
