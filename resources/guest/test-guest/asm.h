/* Assembly helpers shared by the entry paths. */
#ifndef TG_ASM_H
#define TG_ASM_H

#include "layout.h"

#define CR0_PE 0x00000001
#define CR0_NW 0x20000000
#define CR0_CD 0x40000000
#define CR0_PG 0x80000000
#define CR4_PAE 0x00000020
#define MSR_EFER 0xc0000080
#define EFER_LME 0x00000100

/*
 * From 32-bit protected mode with paging off: load our page tables, enable PAE and
 * long mode, turn paging on (caches on) and far-jump to the 64-bit code at \target.
 * Clobbers eax, ecx, edx. Must run on a flat 32-bit code segment.
 */
.macro ENTER_LONG_MODE target
	movl	$pml4, %eax
	movl	%eax, %cr3
	movl	%cr4, %eax
	orl	$CR4_PAE, %eax
	movl	%eax, %cr4
	movl	$MSR_EFER, %ecx
	rdmsr
	orl	$EFER_LME, %eax
	wrmsr
	movl	%cr0, %eax
	andl	$~(CR0_CD | CR0_NW), %eax
	orl	$(CR0_PG | CR0_PE), %eax
	movl	%eax, %cr0
	ljmp	$SEL_CODE64, $\target
.endm

/* Load the flat data selector into every data segment register. */
.macro LOAD_DATA_SEGMENTS
	movw	$SEL_DATA, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	movw	%ax, %fs
	movw	%ax, %gs
.endm

#endif
