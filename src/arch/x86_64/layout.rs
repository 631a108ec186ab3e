//! The guest-physical memory map (Firecracker-compatible), and how guest RAM is split around the
//! MMIO hole below 4 GiB.

/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty; a limit of 0 makes any early exception a triple fault).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux boot_params ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4, PDPT, PD (first GiB in 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line, terminating NUL included.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Extended BIOS data area; the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// Where "high memory" and the kernel start.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole: boot timer, then virtio-mmio slots.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// First address past 32 bits.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The boot-timer pseudo-device (one slot).
pub const BOOT_TIMER_START: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio slot.
pub const MMIO_SLOT_SIZE: u64 = 0x1000;
/// IO-APIC and local APIC, inside the hole.
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (three pages) just below the IO-APIC.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_TSS_ADDRESS_USIZE: usize = 0xfffb_d000;
/// Serial port base and IRQ.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
/// First legacy IRQ handed to virtio devices.
pub const FIRST_DEVICE_IRQ: u32 = 5;
/// Highest IRQ number the IO-APIC routes (24 pins).
pub const LAST_DEVICE_IRQ: u32 = 23;

/// Guest RAM ranges `(start, size)` for `mem_size` bytes: below the MMIO hole, then above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

/// Guest-physical address of the `index`th virtio-mmio slot (the boot timer takes slot 0).
pub fn mmio_slot(index: u64) -> u64 {
    MMIO_GAP_START + (index + 1) * MMIO_SLOT_SIZE
}

/// The `index`th virtio device's slot and IRQ; `None` once the IO-APIC's pins run out.
pub fn device_slot(index: usize) -> Option<crate::arch::DeviceSlot> {
    let irq = FIRST_DEVICE_IRQ.checked_add(u32::try_from(index).ok()?)?;
    (irq <= LAST_DEVICE_IRQ).then(|| crate::arch::DeviceSlot {
        base: mmio_slot(index as u64),
        size: MMIO_SLOT_SIZE,
        irq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
    }

    #[test]
    fn guest_larger_than_hole_start_continues_above_4g() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(ranges, vec![(0, 0xc000_0000), (1 << 32, 1 << 30)]);
        assert_eq!(ranges.iter().map(|r| r.1).sum::<u64>(), 4 << 30);
    }

    #[test]
    fn first_virtio_slot_follows_boot_timer() {
        assert_eq!(mmio_slot(0), 0xc000_1000);
        assert_eq!(mmio_slot(1), 0xc000_2000);
    }

    #[test]
    fn device_slots_end_with_the_io_apic_pins() {
        let first = device_slot(0).unwrap();
        assert_eq!((first.base, first.irq), (0xc000_1000, 5));
        assert_eq!(device_slot(18).unwrap().irq, 23);
        assert!(device_slot(19).is_none());
    }
}
