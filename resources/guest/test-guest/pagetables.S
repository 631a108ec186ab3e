/*
 * The guest's own GDT and page tables, built at link time so that no code has to
 * run before paging can be switched over.
 *
 * Page tables: identity map of [0, 4 GiB) with 2 MiB pages. [3 GiB, 4 GiB) holds the
 * MMIO devices (boot timer and virtio-mmio at 0xC000_0000+, IOAPIC at 0xFEC0_0000,
 * local APIC at 0xFEE0_0000) and is mapped uncached (PCD | PWT).
 */
#include "asm.h"

#define PTE_P 0x001
#define PTE_RW 0x002
#define PTE_PWT 0x008
#define PTE_PCD 0x010
#define PTE_PS 0x080

	.section .data.pagetables, "aw"
	.balign 4096
	.globl	pml4
pml4:
	.quad	pdpt + (PTE_P | PTE_RW)
	.fill	511, 8, 0

	.balign 4096
pdpt:
	.quad	pd + 0x0000 + (PTE_P | PTE_RW)
	.quad	pd + 0x1000 + (PTE_P | PTE_RW)
	.quad	pd + 0x2000 + (PTE_P | PTE_RW)
	.quad	pd + 0x3000 + (PTE_P | PTE_RW)
	.fill	508, 8, 0

	/* Four page directories back to back: 2048 entries of 2 MiB. */
	.balign 4096
pd:
	.set	i, 0
	.rept	2048
	.if	i >= 1536
	.quad	(i << 21) | (PTE_P | PTE_RW | PTE_PS | PTE_PCD | PTE_PWT)
	.else
	.quad	(i << 21) | (PTE_P | PTE_RW | PTE_PS)
	.endif
	.set	i, i + 1
	.endr

	.section .data, "aw"
	.balign 16
	.globl	gdt, gdt_end, gdt_ptr
gdt:
	.quad	0			/* null */
	.quad	0x00af9b000000ffff	/* 0x08: 64-bit code */
	.quad	0x00cf93000000ffff	/* 0x10: flat data */
	.quad	0x00cf9b000000ffff	/* 0x18: flat 32-bit code */
gdt_end:
	.if	gdt_end - gdt - 1 != GDT_LIMIT
	.error	"GDT_LIMIT in layout.h does not match the GDT"
	.endif

	/* Pseudo-descriptor; in 32-bit mode lgdt reads the low 4 bytes of the base. */
	.balign 16
gdt_ptr:
	.word	GDT_LIMIT
	.quad	gdt

	.section .note.GNU-stack, "", @progbits
