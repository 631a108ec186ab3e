//! Guest memory as flick maps it: vm-memory's mmap backend with a dirty-page bitmap per region,
//! so that writes from flick's own devices (used rings, received packets, disk reads) are recorded
//! next to the guest's own writes, which KVM's dirty log records (`track_dirty_pages`, diff
//! snapshots).

use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Guest memory: its regions record every write made through vm-memory.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// The page size of the bitmaps and of KVM's dirty log.
pub const PAGE_SIZE: usize = 4096;

/// Marks in `region`'s bitmap the pages set in `log`, a KVM dirty log (bit n of word w: page
/// 64 w + n of the slot).
pub fn mark_pages(region: &GuestRegionMmap, log: &[u64]) {
    for (w, &word) in log.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let page = w * 64 + bits.trailing_zeros() as usize;
            region.bitmap().mark_dirty(page * PAGE_SIZE, PAGE_SIZE);
            bits &= bits - 1;
        }
    }
}

/// Marks `len` bytes at `offset` of `region` as written (for changes made outside vm-memory,
/// such as pages given back to the host).
pub fn mark_range(region: &GuestRegionMmap, offset: usize, len: usize) {
    region.bitmap().mark_dirty(offset, len);
}

/// Whether the page at `offset` of `region` was written since its bitmap was last reset.
pub fn page_dirty(region: &GuestRegionMmap, offset: usize) -> bool {
    region.bitmap().dirty_at(offset)
}

/// Forgets every recorded write (after a snapshot has saved them).
pub fn reset_dirty(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        let mapping: &vm_memory::MmapRegion<AtomicBitmap> = region;
        mapping.bitmap().reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn device_writes_and_kvm_logs_mark_pages() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * PAGE_SIZE)]).unwrap();
        let region = mem.iter().next().unwrap();
        assert!((0..16).all(|p| !page_dirty(region, p * PAGE_SIZE)));
        // A write through vm-memory, across a page boundary: pages 2 and 3.
        mem.write_slice(&[1u8; 8], GuestAddress(3 * PAGE_SIZE as u64 - 4))
            .unwrap();
        // A KVM log naming pages 0 and 9.
        mark_pages(region, &[1 | (1 << 9)]);
        let dirty: Vec<usize> = (0..16)
            .filter(|&p| page_dirty(region, p * PAGE_SIZE))
            .collect();
        assert_eq!(dirty, [0, 2, 3, 9]);
        reset_dirty(&mem);
        assert!((0..16).all(|p| !page_dirty(region, p * PAGE_SIZE)));
    }
}
