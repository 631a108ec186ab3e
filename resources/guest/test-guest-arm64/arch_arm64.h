/*
 * arm64 side of ../test-guest/tg.h: the virtio drivers, virtqueues, serial and formatting code
 * of ../test-guest are built for arm64 with these definitions. start.S maps the first 512 GiB
 * of the physical address space one to one before any C runs: [0, 2 GiB), the GIC and the
 * devices, as Device-nGnRnE memory, the rest (RAM from 0x8000_0000) as Normal write-back
 * memory, which makes the rings coherent with what the VMM sees and unaligned accesses legal.
 */
#ifndef TG_ARCH_ARM64_H
#define TG_ARCH_ARM64_H

/* Firecracker's arm64 device layout. */
#define BOOT_TIMER_ADDR 0x40000000UL
#define BOOT_TIMER_VALUE 123
#define UART_BASE 0x40002000UL

/* Most CPUs the SMP code starts (start.S has this many secondary stacks). */
#define MAX_CPUS 8

/* The identity map of start.S: 512 blocks of 1 GiB. */
#define IDENTITY_MAP_END (1UL << 39)

static inline u32 mmio_read32(u64 addr)
{
	return *(volatile u32 *)addr;
}

static inline void mmio_write32(u64 addr, u32 v)
{
	*(volatile u32 *)addr = v;
}

static inline u8 mmio_read8(u64 addr)
{
	return *(volatile u8 *)addr;
}

static inline void mmio_write8(u64 addr, u8 v)
{
	*(volatile u8 *)addr = v;
}

/*
 * The generic timer's virtual counter stands in for the TSC: the drivers' deadlines and
 * benchmarks count its ticks (timer.c converts them with CNTFRQ_EL0).
 */
static inline u64 rdtsc(void)
{
	u64 v;
	__asm__ volatile("isb; mrs %0, cntvct_el0" : "=r"(v) : : "memory");
	return v;
}

static inline void cpu_relax(void)
{
	__asm__ volatile("yield" : : : "memory");
}

static inline void barrier(void)
{
	__asm__ volatile("" : : : "memory");
}

/* Ring writes (Normal memory) before the MMIO write that notifies the device. */
static inline void io_wmb(void)
{
	__asm__ volatile("dmb oshst" : : : "memory");
}

/* A full fence, store-load included. */
static inline void mb(void)
{
	__asm__ volatile("dmb ish" : : : "memory");
}

static inline int phys_ok(u64 addr, u64 len)
{
	return addr != 0 && addr < IDENTITY_MAP_END && len <= IDENTITY_MAP_END - addr;
}

/* Pointer to physical memory; opaque to the compiler. */
static inline const void *phys(u64 addr)
{
	__asm__("" : "+r"(addr));
	return (const void *)addr;
}

/* The 8250 UART's byte-wide registers on MMIO. */
static inline u8 uart_in(u32 reg)
{
	return mmio_read8(UART_BASE + reg);
}

static inline void uart_out(u32 reg, u8 v)
{
	mmio_write8(UART_BASE + reg, v);
}

#endif
