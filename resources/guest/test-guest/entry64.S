/*
 * Linux 64-bit boot protocol entry (e_entry of both images) and the 64-bit start-up
 * code shared by every entry path.
 *
 * Entered in long mode with paging on (the VMM identity-maps at least the first GiB),
 * interrupts off, RSI = physical address of boot_params (the zero page).
 */
#include "asm.h"

	.section .text.entry, "ax"
	.code64
	.globl	linux64_entry
linux64_entry:
	cli
	cld
	movq	%rsi, %r13			/* boot_params */
	movl	$PROTO_LINUX64, %r12d
	movl	$stack_top, %esp		/* nothing from the VMM but RSI is used */

	/* Our own page tables (they identity-map this code too) and GDT. */
	movl	$pml4, %eax
	movq	%rax, %cr3
	lgdt	gdt_ptr
	pushq	$SEL_CODE64
	pushq	$common64
	lretq

/*
 * Common 64-bit start: r12d = protocol, r13 = physical address of the boot structure.
 * Our page tables and GDT are loaded, CS = SEL_CODE64.
 */
	.globl	common64
common64:
	LOAD_DATA_SEGMENTS
	movl	$stack_top, %esp

	/* Zero .bss ourselves rather than trusting the loader to do it. */
	movl	$__bss_start, %edi
	movl	$__bss_end, %ecx
	subl	%edi, %ecx
	shrl	$3, %ecx			/* .bss is 8-byte aligned and sized */
	xorl	%eax, %eax
	rep stosq

	movl	%r12d, %edi
	movq	%r13, %rsi
	call	tg_main
1:	cli
	hlt
	jmp	1b

	.section .stack, "aw", @nobits
	.balign 16
stack_bottom:
	.skip	16384
	.globl	stack_top
stack_top:

	.section .note.GNU-stack, "", @progbits
