//! The guest-physical memory map (Firecracker's arm64 layout): devices in the first 2 GiB, guest
//! RAM from 2 GiB up; the kernel at the start of RAM, the device tree in the last 2 MiB, the
//! initrd below it.

/// Start of guest RAM.
pub const DRAM_START: u64 = 0x8000_0000;
/// The most RAM the layout holds (up to the 1 TiB line).
pub const DRAM_MAX_SIZE: u64 = 0xff_8000_0000;
/// Where the kernel Image is placed (2 MiB aligned, as the arm64 boot protocol asks).
pub const KERNEL_START: u64 = DRAM_START;
/// Room reserved for the device tree at the end of RAM (its largest size).
pub const FDT_MAX_SIZE: u64 = 0x20_0000;
/// Size of one device slot.
pub const MMIO_SLOT_SIZE: u64 = 0x1000;
/// First device address: the boot timer, then the RTC, the serial port, the virtio devices.
pub const MMIO_START: u64 = 0x4000_0000;
pub const BOOT_TIMER_START: u64 = MMIO_START;
pub const RTC_START: u64 = MMIO_START + MMIO_SLOT_SIZE;
pub const SERIAL_START: u64 = RTC_START + MMIO_SLOT_SIZE;
pub const FIRST_VIRTIO_START: u64 = SERIAL_START + MMIO_SLOT_SIZE;

/// The GICv3 distributor, just below the devices.
pub const GIC_DIST_SIZE: u64 = 0x1_0000;
pub const GIC_DIST_START: u64 = MMIO_START - GIC_DIST_SIZE;
/// One redistributor per vCPU (RD and SGI frames), below the distributor.
pub const GIC_REDIST_SIZE_PER_CPU: u64 = 0x2_0000;

/// Interrupt numbers here are SPI numbers (GIC INTID - 32), which are also the GSIs irqfds take.
pub const SERIAL_SPI: u32 = 0;
pub const RTC_SPI: u32 = 1;
pub const FIRST_VIRTIO_SPI: u32 = 2;
/// The GIC is created with 128 interrupt IDs: 32 private ones and SPIs 0-95.
pub const GIC_NR_IRQS: u32 = 128;
pub const LAST_SPI: u32 = GIC_NR_IRQS - 32 - 1;

/// The GICv3 ITS's frames (control and translation, 64 KiB each), below the redistributors.
pub const GIC_ITS_SIZE: u64 = 0x2_0000;

/// Start of the ITS for `vcpus` vCPUs.
pub fn gic_its_start(vcpus: u8) -> u64 {
    gic_redist_start(vcpus) - GIC_ITS_SIZE
}

/// Start of the redistributor region for `vcpus` vCPUs.
pub fn gic_redist_start(vcpus: u8) -> u64 {
    GIC_DIST_START - gic_redist_size(vcpus)
}

/// Size of the redistributor region for `vcpus` vCPUs.
pub fn gic_redist_size(vcpus: u8) -> u64 {
    GIC_REDIST_SIZE_PER_CPU * u64::from(vcpus)
}

/// Guest RAM: one range from [`DRAM_START`].
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    vec![(DRAM_START, mem_size.min(DRAM_MAX_SIZE))]
}

/// The `index`th virtio device's slot and SPI; `None` once the GIC's SPIs run out.
pub fn device_slot(index: usize) -> Option<crate::arch::DeviceSlot> {
    let spi = FIRST_VIRTIO_SPI.checked_add(u32::try_from(index).ok()?)?;
    (spi <= LAST_SPI).then(|| crate::arch::DeviceSlot {
        base: FIRST_VIRTIO_START + index as u64 * MMIO_SLOT_SIZE,
        size: MMIO_SLOT_SIZE,
        irq: spi,
    })
}

/// Where the device tree goes for RAM ending at `ram_end`: the start of its last 2 MiB.
pub fn fdt_start(ram_end: u64) -> u64 {
    (ram_end - FDT_MAX_SIZE) & !(FDT_MAX_SIZE - 1)
}

/// The MPIDR KVM gives vCPU `index` (affinity levels 0 and 1 of the vCPU id).
pub fn mpidr(index: u8) -> u64 {
    let id = u64::from(index);
    (id & 0xf) | ((id >> 4) << 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_gic_sit_below_ram() {
        let last = device_slot(usize::try_from(LAST_SPI - FIRST_VIRTIO_SPI).unwrap()).unwrap();
        assert!(last.base + last.size <= DRAM_START);
        assert!(device_slot(usize::try_from(LAST_SPI).unwrap()).is_none());
        assert_eq!(device_slot(0).unwrap().base, 0x4000_3000);
        assert!(gic_redist_start(255) > 0x1000_0000);
        assert_eq!(gic_redist_start(1) + gic_redist_size(1), GIC_DIST_START);
        assert_eq!(gic_its_start(255) + GIC_ITS_SIZE, gic_redist_start(255));
        assert_eq!(gic_its_start(255) % 0x1_0000, 0);
    }

    #[test]
    fn fdt_is_in_the_last_two_mib() {
        let (start, size) = ram_ranges(128 << 20)[0];
        let fdt = fdt_start(start + size);
        assert_eq!(fdt, start + size - FDT_MAX_SIZE);
        assert_eq!(fdt % FDT_MAX_SIZE, 0);
    }

    #[test]
    fn mpidr_follows_kvm() {
        assert_eq!(mpidr(0), 0);
        assert_eq!(mpidr(15), 15);
        assert_eq!(mpidr(16), 0x100);
    }
}
