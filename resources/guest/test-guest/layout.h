/* Constants shared by the C and assembly sources. */
#ifndef TG_LAYOUT_H
#define TG_LAYOUT_H

#ifdef __ASSEMBLER__
#define UL(x) x
#else
#define UL(x) x##UL
#endif

/* Boot protocols (first argument of tg_main). */
#define PROTO_LINUX64 1
#define PROTO_PVH 2

/* GDT selectors (see pagetables.S). */
#define SEL_CODE64 0x08
#define SEL_DATA 0x10
#define SEL_CODE32 0x18
#define GDT_LIMIT (4 * 8 - 1)

/* Devices. */
#define COM1_BASE 0x3f8
#define BOOT_TIMER_ADDR UL(0xc0000000)
#define BOOT_TIMER_VALUE 123
#define LAPIC_BASE 0xfee00000
#define LAPIC_ID 0x20
#define LAPIC_SVR 0xf0
#define LAPIC_ICR_LOW 0x300
#define LAPIC_ICR_HIGH 0x310

/* The page tables identity-map [0, 4 GiB) with 2 MiB pages; [3 GiB, 4 GiB) uncached. */
#define IDENTITY_MAP_END UL(0x100000000)

/* Most CPUs the SMP code tracks (Firecracker allows 32 vCPUs). */
#define MAX_CPUS 64

/* Preferred page for the AP real-mode trampoline. */
#define AP_TRAMPOLINE_PREFERRED 0x3000

#endif
