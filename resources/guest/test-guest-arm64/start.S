/*
 * arm64 test guest entry. The file starts with the arm64 Image header, so a VMM loads it like a
 * Linux kernel Image: entered at its first byte at EL1 with the MMU off, X0 = the device tree.
 * Secondary CPUs enter at secondary_entry (PSCI CPU_ON) with X0 = their index.
 */
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
	adr	x1, boot_stack_top
	mov	sp, x1
	/* clear .bss */
	adr	x1, __bss_start
	adr	x2, __bss_end
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
	/* X0 = CPU index (PSCI context id); stacks of 4 KiB each below secondary_stacks_top */
	adr	x1, secondary_stacks_top
	lsl	x2, x0, #12
	sub	x1, x1, x2
	mov	sp, x1
	bl	tg_secondary
4:	wfi
	b	4b

	.section .noinit, "aw", %nobits
	.balign 16
	.space	16384
boot_stack_top:
	.space	4096 * 8
secondary_stacks_top:
