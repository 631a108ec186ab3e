/*
 * Application processor start-up.
 *
 * ap_tramp_start..ap_tramp_end is copied by the BSP to a free page below 1 MiB, whose
 * page number is the SIPI vector; an AP starts there in real mode with CS = page >> 4,
 * IP = 0. The trampoline is position independent: it addresses its own data through
 * DS = CS, loads the guest's GDT, enters 32-bit protected mode and jumps to
 * ap_entry32 in the loaded image, which switches to long mode on the shared page
 * tables.
 *
 * In long mode each AP reads its local APIC id, stores it in ap_apic_ids[] (slot taken
 * with lock xadd on ap_next_slot), then increments ap_online and parks (cli; hlt).
 * It never touches a stack.
 */
#include "asm.h"

	.section .rodata.trampoline, "a"
	.code16
	.balign	16
	.globl	ap_tramp_start, ap_tramp_end
ap_tramp_start:
	cli
	cld
	movw	%cs, %ax
	movw	%ax, %ds
	lgdtl	%ds:(ap_tramp_gdtr - ap_tramp_start)
	movl	%cr0, %eax
	andl	$~(CR0_CD | CR0_NW), %eax
	orl	$CR0_PE, %eax
	movl	%eax, %cr0
	ljmpl	*%ds:(ap_tramp_far32 - ap_tramp_start)

	.balign	8
ap_tramp_gdtr:
	.word	GDT_LIMIT
	.long	gdt
ap_tramp_far32:
	.long	ap_entry32
	.word	SEL_CODE32
ap_tramp_end:

	.section .text32, "ax"
	.code32
ap_entry32:
	LOAD_DATA_SEGMENTS
	ENTER_LONG_MODE ap_entry64

	.text
	.code64
ap_entry64:
	LOAD_DATA_SEGMENTS
	movl	$(LAPIC_BASE + LAPIC_ID), %edx
	movl	(%rdx), %eax
	shrl	$24, %eax			/* xAPIC id */
	movl	$1, %ecx
	lock xaddl %ecx, ap_next_slot(%rip)
	cmpl	$MAX_CPUS, %ecx
	jae	1f
	leaq	ap_apic_ids(%rip), %rdx
	movl	%eax, (%rdx,%rcx,4)
1:	lock incl ap_online(%rip)
2:	cli
	hlt
	jmp	2b

	.section .note.GNU-stack, "", @progbits
