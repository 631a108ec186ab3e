/*
 * arm64 test guest entry. The file starts with the arm64 Image header, so a VMM loads it like a
 * Linux kernel Image: entered at its first byte at EL1 with the MMU off, X0 = the device tree.
 * Secondary CPUs enter at secondary_entry (PSCI CPU_ON) with X0 = their index.
 *
 * Before any C runs, each CPU turns on the MMU with one identity map (built once, by the boot
 * CPU): 4 KiB granule, 39-bit addresses, so one level-1 table of 512 blocks of 1 GiB.
 * Blocks 0 and 1 ([0, 2 GiB): the GIC, the UART, the boot timer, virtio-mmio) are
 * Device-nGnRnE and never executable; the rest, guest RAM from 0x8000_0000, is Normal
 * write-back memory, inner shareable. With the MMU off every access would be a Device access:
 * unaligned loads would fault, and the virtqueues would be uncached while the VMM reads them
 * through its cached mapping.
 */
#define MAIR_VALUE 0xff00		/* attr 0: Device-nGnRnE; attr 1: Normal, write-back */
#define BLOCK_DEVICE 0x0060000000000401	/* UXN, PXN, AF, attr 0, block */
#define BLOCK_NORMAL 0x0000000000000705	/* AF, inner shareable, attr 1, block */
/* T0SZ=25 (39 bits), walks write-back cacheable and inner shareable, 4 KiB granule, no TTBR1
 * walks (EPD1); IPS is set from ID_AA64MMFR0_EL1.PARange at run time. */
#define TCR_VALUE 0x0000000000803519
#define SCTLR_M (1 << 0)
#define SCTLR_A (1 << 1)
#define SCTLR_C (1 << 2)
#define SCTLR_I (1 << 12)

	.section .head, "ax"
	.globl _head
_head:
	b	primary_entry		/* code0 */
	.long	0			/* code1 */
	.quad	0			/* text_offset */
	.quad	_end - _head	/* image_size */
	.quad	0x8			/* flags: little endian, 4K pages unspecified, anywhere in RAM */
	.quad	0, 0, 0			/* res2-res4 */
	.ascii	"ARM\x64"		/* magic */
	.long	0			/* res5 */

	.text
primary_entry:
	mov	x19, x0			/* device tree */
	bl	build_identity_map
	bl	mmu_on
	ldr	x1, =boot_stack_top
	mov	sp, x1
	/* clear .bss */
	ldr	x1, =__bss_start
	ldr	x2, =__bss_end
1:	cmp	x1, x2
	b.hs	2f
	str	xzr, [x1], #8
	b	1b
2:	mov	x0, x19
	bl	tg_main
3:	wfi
	b	3b

	.globl secondary_entry
secondary_entry:
	mov	x19, x0			/* CPU index (PSCI context id) */
	bl	mmu_on
	/* stacks of 4 KiB each below secondary_stacks_top */
	ldr	x1, =secondary_stacks_top
	lsl	x2, x19, #12
	sub	x1, x1, x2
	mov	sp, x1
	mov	x0, x19
	bl	tg_secondary
4:	wfi
	b	4b

/* Fills identity_map (with the MMU and caches off: the stores go to memory), then drops any
 * cache lines that hold older contents of it, so the table walker reads these entries. */
build_identity_map:
	ldr	x1, =identity_map
	ldr	x4, =BLOCK_DEVICE
	ldr	x5, =BLOCK_NORMAL
	mov	x2, #0
1:	lsl	x3, x2, #30
	cmp	x2, #2
	csel	x6, x4, x5, lo
	orr	x3, x3, x6
	str	x3, [x1, x2, lsl #3]
	add	x2, x2, #1
	cmp	x2, #512
	b.lo	1b
	mrs	x6, ctr_el0		/* DminLine: log2 of the smallest D-cache line in words */
	ubfx	x6, x6, #16, #4
	mov	x7, #4
	lsl	x7, x7, x6
	mov	x2, x1
	add	x3, x1, #4096
2:	dc	ivac, x2
	add	x2, x2, x7
	cmp	x2, x3
	b.lo	2b
	dsb	sy
	ret

/* Turns on the MMU and the caches with identity_map; clobbers x1-x3. */
mmu_on:
	ldr	x1, =identity_map
	msr	ttbr0_el1, x1
	ldr	x1, =MAIR_VALUE
	msr	mair_el1, x1
	ldr	x1, =TCR_VALUE
	mrs	x2, id_aa64mmfr0_el1
	ubfx	x2, x2, #0, #4		/* PARange */
	mov	x3, #5			/* at most 48 bits: 52 needs more than this table format */
	cmp	x2, x3
	csel	x2, x3, x2, hi
	bfi	x1, x2, #32, #3		/* IPS */
	msr	tcr_el1, x1
	isb
	tlbi	vmalle1
	ic	iallu
	dsb	nsh
	isb
	mrs	x1, sctlr_el1
	ldr	x2, =(SCTLR_M | SCTLR_C | SCTLR_I)
	orr	x1, x1, x2
	bic	x1, x1, #SCTLR_A
	msr	sctlr_el1, x1
	isb
	ret

	.ltorg

	.section .noinit, "aw", %nobits
	.balign 4096
identity_map:
	.space	4096
	.balign 16
	.space	16384
boot_stack_top:
	.space	4096 * 8
secondary_stacks_top:
