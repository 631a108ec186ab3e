/* x86_64 side of tg.h. */
#ifndef TG_ARCH_X86_H
#define TG_ARCH_X86_H

#include "layout.h"

/* ---- port and memory-mapped I/O ---- */

static inline void outb(u16 port, u8 v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline u32 mmio_read32(u64 addr)
{
	return *(volatile u32 *)addr;
}

static inline void mmio_write32(u64 addr, u32 v)
{
	*(volatile u32 *)addr = v;
}

static inline void mmio_write8(u64 addr, u8 v)
{
	*(volatile u8 *)addr = v;
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

static inline void cpu_relax(void)
{
	__asm__ volatile("pause" : : : "memory");
}

static inline void barrier(void)
{
	__asm__ volatile("" : : : "memory");
}

/* Ring writes before the MMIO write that notifies the device: x86 keeps stores in order. */
static inline void io_wmb(void)
{
	barrier();
}

/* A full fence, store-load included (x86 needs a locked instruction for that). */
static inline void mb(void)
{
	__asm__ volatile("lock; orl $0, (%%rsp)" : : : "memory", "cc");
}

/* The 16550 UART's registers, at COM1's I/O ports. */
static inline u8 uart_in(u32 reg)
{
	return inb((u16)(COM1_BASE + reg));
}

static inline void uart_out(u32 reg, u8 v)
{
	outb((u16)(COM1_BASE + reg), v);
}

/* Physical memory is identity-mapped for the first 4 GiB (see pagetables.S). */
static inline int phys_ok(u64 addr, u64 len)
{
	return addr != 0 && addr < IDENTITY_MAP_END && len <= IDENTITY_MAP_END - addr;
}

/* Pointer to physical memory; opaque to the compiler (low addresses are not NULL here). */
static inline const void *phys(u64 addr)
{
	__asm__("" : "+r"(addr));
	return (const void *)addr;
}

#endif
