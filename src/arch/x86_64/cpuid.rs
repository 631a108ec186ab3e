//! The guest's CPUID: KVM's supported set, normalised per vCPU (APIC ids, topology leaves, no
//! PMU), optionally stripped down to what KVM's instruction emulator can execute.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use crate::config::CpuProfile;

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX bit 24: the local APIC timer's TSC-deadline mode. KVM emulates it whenever it has
/// `KVM_CAP_TSC_DEADLINE_TIMER` but never sets it in `KVM_GET_SUPPORTED_CPUID`: the VMM must.
pub const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Leaf 1 ECX features the conservative profile removes: CX16, PCID, MOVBE, POPCNT, XSAVE,
/// OSXSAVE, AVX, F16C, RDRAND, FMA.
const CONSERVATIVE_LEAF1_ECX: u32 = (1 << 12)
    | (1 << 13)
    | (1 << 17)
    | (1 << 22)
    | (1 << 23)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 29)
    | (1 << 30);
/// Leaf 7.0 EBX features kept by the conservative profile (everything else goes): TSC_ADJUST,
/// ERMS, CLFLUSHOPT, CLWB.
const CONSERVATIVE_LEAF7_EBX_KEEP: u32 = (1 << 1) | (1 << 9) | (1 << 23) | (1 << 24);
/// Leaf 7.0 EDX features kept: FSRM, MD_CLEAR, SPEC_CTRL family, ARCH_CAPABILITIES, SSBD.
const CONSERVATIVE_LEAF7_EDX_KEEP: u32 =
    (1 << 4) | (1 << 10) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 29) | (1 << 31);
/// Leaf 0x8000_0001 ECX features removed: ABM/LZCNT, SSE4A, MISALIGNSSE, XOP, FMA4, TBM.
const CONSERVATIVE_EXT1_ECX: u32 =
    (1 << 5) | (1 << 6) | (1 << 7) | (1 << 11) | (1 << 16) | (1 << 21);

/// KVM's paravirtual feature leaf (EAX: `KVM_FEATURE_*` bits).
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// KVM PV features whose guest side makes hypercalls: MMU_OP (2, `KVM_HC_MMU_OP`), PV_UNHALT
/// (7, `KVM_HC_KICK_CPU` from PV spinlocks), PV_SEND_IPI (11, `KVM_HC_SEND_IPI`),
/// PV_SCHED_YIELD (13, `KVM_HC_SCHED_YIELD`), HC_MAP_GPA_RANGE (16, `KVM_HC_MAP_GPA_RANGE`).
const KVM_FEATURES_USING_HYPERCALLS: u32 = (1 << 2) | (1 << 7) | (1 << 11) | (1 << 13) | (1 << 16);

/// Guest topology, for the topology leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub vcpu_count: u8,
    pub threads_per_core: u8,
}

fn ceil_log2(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjusts `entries` (KVM's supported CPUID) for vCPU `cpu_index`.
pub fn normalize(
    entries: &mut [kvm_cpuid_entry2],
    cpu_index: u8,
    topo: Topology,
    profile: CpuProfile,
) {
    let apic_id = u32::from(cpu_index);
    let count = u32::from(topo.vcpu_count);
    let threads = u32::from(topo.threads_per_core.max(1));
    let conservative = profile == CpuProfile::Conservative;
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_00ff) | (apic_id << 24) | (count << 16) | (8 << 8);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
                if conservative {
                    e.ecx &= !CONSERVATIVE_LEAF1_ECX;
                }
            }
            0x4 => {
                let cores = (count / threads).max(1);
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count } else { threads };
                e.eax = (e.eax & 0x3ff) | ((cores - 1) << 26) | ((sharing - 1) << 14);
            }
            0x7 if conservative => {
                if e.index == 0 {
                    e.ebx &= CONSERVATIVE_LEAF7_EBX_KEEP;
                    e.ecx = 0;
                    e.edx &= CONSERVATIVE_LEAF7_EDX_KEEP;
                } else {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = 0;
                    e.edx = 0;
                }
            }
            0xa => {
                // No virtual PMU.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                let (shift, logical, level_type) = match e.index {
                    0 => (ceil_log2(threads), threads, 1),
                    1 => (ceil_log2(count), count, 2),
                    _ => (0, 0, 0),
                };
                e.eax = shift;
                e.ebx = logical;
                e.ecx = (level_type << 8) | (e.index & 0xff);
                e.edx = apic_id;
            }
            0xd | 0x12 | 0x14 if conservative => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0x8000_0001 if conservative => e.ecx &= !CONSERVATIVE_EXT1_ECX,
            _ => {}
        }
    }
}

/// Removes the KVM PV features that make hypercalls from `entries`. On PVM hosts a VMCALL or
/// VMMCALL from the guest kernel loops forever in KVM's emulator, so an SMP guest that sends PV
/// IPIs or kicks a vCPU waiting on a PV spinlock hangs; the guest falls back to APIC IPIs and
/// native spinlocks when the bits are clear. kvmclock, steal time and PV EOI use MSRs and shared
/// memory and stay.
pub fn hide_pv_hypercalls(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries
        .iter_mut()
        .filter(|e| e.function == KVM_CPUID_FEATURES)
    {
        e.eax &= !KVM_FEATURES_USING_HYPERCALLS;
    }
}

/// Adds the TSC-deadline timer to leaf 1 of KVM's supported CPUID. Call it when KVM reports
/// `KVM_CAP_TSC_DEADLINE_TIMER`. Without it a Linux guest on AMD hosts (whose CPUs have no
/// TSC-deadline bit of their own for KVM to pass on) falls back to the PIT for its timer checks.
pub fn add_tsc_deadline(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries.iter_mut().filter(|e| e.function == 0x1) {
        e.ecx |= LEAF1_ECX_TSC_DEADLINE;
    }
}

/// A copy of `supported` normalised for vCPU `cpu_index`.
pub fn for_vcpu(supported: &CpuId, cpu_index: u8, topo: Topology, profile: CpuProfile) -> CpuId {
    let mut cpuid = supported.clone();
    normalize(cpuid.as_mut_slice(), cpu_index, topo, profile);
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    const TOPO4: Topology = Topology {
        vcpu_count: 4,
        threads_per_core: 1,
    };

    #[test]
    fn leaf1_carries_apic_id_and_count_and_hypervisor_bit() {
        let mut e = [entry(1, 0, [0, 0xffff_ffff, 0, 0])];
        normalize(&mut e, 3, TOPO4, CpuProfile::Host);
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn conservative_profile_hides_xsave_popcnt_cx16_smap_smep() {
        let mut e = [
            entry(1, 0, [0, 0, !0, 0]),
            entry(7, 0, [0, !0, !0, !0]),
            entry(0xd, 0, [!0; 4]),
        ];
        normalize(&mut e, 0, TOPO4, CpuProfile::Conservative);
        for bit in [13, 23, 26, 27] {
            assert_eq!(e[0].ecx & (1 << bit), 0, "leaf 1 ecx bit {bit}");
        }
        assert_eq!(e[1].ebx & ((1 << 7) | (1 << 20)), 0, "smep/smap");
        assert_eq!(e[1].ecx, 0);
        assert_eq!([e[2].eax, e[2].ebx, e[2].ecx, e[2].edx], [0; 4]);
    }

    #[test]
    fn host_profile_keeps_features() {
        let mut e = [
            entry(1, 0, [0, 0, 1 << 26, 0]),
            entry(7, 0, [0, 1 << 20, 0, 0]),
        ];
        normalize(&mut e, 0, TOPO4, CpuProfile::Host);
        assert_ne!(e[0].ecx & (1 << 26), 0);
        assert_ne!(e[1].ebx & (1 << 20), 0);
    }

    #[test]
    fn extended_topology_reports_core_level_and_apic_id() {
        let mut e = [
            entry(0xb, 0, [0; 4]),
            entry(0xb, 1, [0; 4]),
            entry(0xb, 2, [0; 4]),
        ];
        normalize(&mut e, 2, TOPO4, CpuProfile::Host);
        assert_eq!((e[0].ebx, e[0].ecx >> 8, e[0].edx), (1, 1, 2));
        assert_eq!((e[1].eax, e[1].ebx, e[1].ecx >> 8), (2, 4, 2));
        assert_eq!(e[2].ecx >> 8, 0);
    }

    #[test]
    fn pv_features_using_hypercalls_are_hidden() {
        // Every KVM_FEATURE bit Linux 6.1 knows, plus CLOCKSOURCE_STABLE (24).
        let all = 0x0003_ffff | (1 << 24);
        let mut e = [entry(KVM_CPUID_FEATURES, 0, [all, 0, 0, 0])];
        hide_pv_hypercalls(&mut e);
        for bit in [2, 7, 11, 13, 16] {
            assert_eq!(e[0].eax & (1 << bit), 0, "KVM_FEATURE bit {bit}");
        }
        // kvmclock (0, 3, 24), NOP_IO_DELAY, ASYNC_PF, STEAL_TIME, PV_EOI, PV_TLB_FLUSH stay.
        for bit in [0, 1, 3, 4, 5, 6, 9, 24] {
            assert_ne!(e[0].eax & (1 << bit), 0, "KVM_FEATURE bit {bit}");
        }
    }

    #[test]
    fn tsc_deadline_is_added_to_leaf1_only() {
        let mut e = [entry(1, 0, [0; 4]), entry(7, 0, [0; 4])];
        add_tsc_deadline(&mut e);
        assert_eq!(e[0].ecx, LEAF1_ECX_TSC_DEADLINE);
        assert_eq!([e[1].eax, e[1].ebx, e[1].ecx, e[1].edx], [0; 4]);
    }

    #[test]
    fn both_profiles_keep_the_tsc_deadline_timer() {
        for profile in [CpuProfile::Host, CpuProfile::Conservative] {
            let mut e = [entry(1, 0, [0, 0, LEAF1_ECX_TSC_DEADLINE, 0])];
            normalize(&mut e, 1, TOPO4, profile);
            assert_ne!(e[0].ecx & LEAF1_ECX_TSC_DEADLINE, 0, "{profile:?}");
        }
    }

    #[test]
    fn hiding_pv_hypercalls_leaves_other_leaves_alone() {
        let mut e = [entry(1, 0, [!0; 4]), entry(0x4000_0000, 0, [!0; 4])];
        hide_pv_hypercalls(&mut e);
        assert_eq!([e[0].eax, e[0].ebx, e[0].ecx, e[0].edx], [!0; 4]);
        assert_eq!([e[1].eax, e[1].ebx, e[1].ecx, e[1].edx], [!0; 4]);
    }

    #[test]
    fn ceil_log2_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 32].map(ceil_log2), [0, 1, 2, 2, 3, 5]);
    }
}
