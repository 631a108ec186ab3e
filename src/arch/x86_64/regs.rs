//! Initial vCPU state for the two entry protocols: Linux 64-bit (long mode, identity-mapped first
//! GiB, RSI = boot_params) and PVH (32-bit protected mode, paging off, EBX = hvm_start_info).
//! Also the boot GDT and page tables, which live in guest memory.
//!
//! Narrowing casts here are exact: GDT fields and LAPIC register bytes are built from constants.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

use crate::memory::GuestMemoryMmap;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    PVH_INFO_START, ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Selectors the Linux boot protocol requires (`__BOOT_CS`, `__BOOT_DS`), plus the TSS.
const CODE_SELECTOR_INDEX: usize = 2;
const DATA_SELECTOR_INDEX: usize = 3;
const TSS_SELECTOR_INDEX: usize = 4;

/// How the guest is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit long mode at `entry`, RSI = boot_params.
    Linux64,
    /// 32-bit protected mode at `entry`, EBX = hvm_start_info.
    Pvh,
}

/// Encodes a GDT descriptor from access/flags bits, base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// Decodes a GDT descriptor at `index` into the segment KVM expects.
pub fn segment_from_gdt(entry: u64, index: usize) -> kvm_segment {
    let granular = (entry >> 55) & 1 == 1;
    let raw_limit = ((entry >> 32) & 0x000f_0000) | (entry & 0xffff);
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular {
            ((raw_limit << 12) | 0xfff) as u32
        } else {
            raw_limit as u32
        },
        selector: (index * 8) as u16,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if present == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// The boot GDT for `mode`.
pub fn boot_gdt(mode: EntryMode) -> [u64; 5] {
    let code = match mode {
        EntryMode::Linux64 => gdt_entry(0xa09b, 0, 0xfffff),
        EntryMode::Pvh => gdt_entry(0xc09b, 0, 0xfffff),
    };
    [
        0,
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0x67),
    ]
}

/// Writes the boot GDT, an empty IDT and (for long mode) identity page tables for the first GiB.
pub fn write_boot_tables(
    mem: &GuestMemoryMmap,
    mode: EntryMode,
) -> vm_memory::GuestMemoryResult<()> {
    for (i, entry) in boot_gdt(mode).iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + (i as u64) * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    if mode == EntryMode::Linux64 {
        mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
        mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))?;
        let mut pd = [0u8; 4096];
        for (i, chunk) in pd.chunks_exact_mut(8).enumerate() {
            // 2 MiB page, present, writable.
            chunk.copy_from_slice(&(((i as u64) << 21) | 0x83).to_le_bytes());
        }
        mem.write_slice(&pd, GuestAddress(PDE_START))?;
    }
    Ok(())
}

/// Special registers for `mode`, starting from the vCPU's current ones.
pub fn boot_sregs(mut sregs: kvm_sregs, mode: EntryMode) -> kvm_sregs {
    let gdt = boot_gdt(mode);
    let code = segment_from_gdt(gdt[CODE_SELECTOR_INDEX], CODE_SELECTOR_INDEX);
    let data = segment_from_gdt(gdt[DATA_SELECTOR_INDEX], DATA_SELECTOR_INDEX);
    let tss = segment_from_gdt(gdt[TSS_SELECTOR_INDEX], TSS_SELECTOR_INDEX);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match mode {
        EntryMode::Linux64 => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    sregs
}

/// General registers at entry.
pub fn boot_regs(mode: EntryMode, entry: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        EntryMode::Pvh => regs.rbx = PVH_INFO_START,
    }
    regs
}

/// x87/SSE control words at reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSR values at boot: syscall MSRs cleared, TSC at 0, fast strings on, MTRRs on with write-back.
pub const BOOT_MSRS: [(u32, u64); 11] = [
    (0x174, 0),             // IA32_SYSENTER_CS
    (0x175, 0),             // IA32_SYSENTER_ESP
    (0x176, 0),             // IA32_SYSENTER_EIP
    (0xc000_0081, 0),       // STAR
    (0xc000_0082, 0),       // LSTAR
    (0xc000_0083, 0),       // CSTAR
    (0xc000_0084, 0),       // SYSCALL_MASK
    (0xc000_0102, 0),       // KERNEL_GS_BASE
    (0x10, 0),              // IA32_TSC
    (0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
    (0x2ff, (1 << 11) | 6), // MTRR default type: enabled, write-back
];

/// Programs LINT0 as ExtINT and LINT1 as NMI, as a BIOS would.
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_NMI: u32 = 0x4;
    const MODE_EXTINT: u32 = 0x7;
    let mut lapic = vcpu.get_lapic()?;
    for (offset, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = lapic.regs[offset + i] as u8;
        }
        let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)
}

/// The boot MSRs as KVM's list type.
pub fn boot_msrs() -> Msrs {
    let entries: Vec<_> = BOOT_MSRS
        .iter()
        .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    // The list is a small constant, far below the wrapper's capacity.
    Msrs::from_entries(&entries).expect("boot MSR list fits")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entry_encodes_flat_64bit_code() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn segment_decoding_round_trips_flat_data_segment() {
        let seg = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 3);
        assert_eq!((seg.base, seg.limit, seg.selector), (0, 0xffff_ffff, 0x18));
        assert_eq!(
            (seg.type_, seg.present, seg.s, seg.db, seg.g),
            (3, 1, 1, 1, 1)
        );
    }

    #[test]
    fn linux64_sregs_enable_long_mode_with_boot_selectors() {
        let sregs = boot_sregs(kvm_sregs::default(), EntryMode::Linux64);
        assert_eq!(sregs.cs.selector, 0x10);
        assert_eq!(sregs.ds.selector, 0x18);
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
    }

    #[test]
    fn pvh_sregs_are_32bit_protected_without_paging() {
        let sregs = boot_sregs(kvm_sregs::default(), EntryMode::Pvh);
        assert_eq!((sregs.cs.l, sregs.cs.db), (0, 1));
        assert_eq!(sregs.cr0 & X86_CR0_PG, 0);
        assert_eq!(sregs.efer, 0);
    }

    #[test]
    fn entry_registers_point_at_boot_structures() {
        assert_eq!(boot_regs(EntryMode::Linux64, 0x100000).rsi, ZERO_PAGE_START);
        assert_eq!(boot_regs(EntryMode::Pvh, 0x100000).rbx, PVH_INFO_START);
    }
}
