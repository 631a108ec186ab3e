/*
 * Xen PVH entry (only linked into testguest-pvh.elf).
 *
 * The ELF note XEN_ELFNOTE_PHYS32_ENTRY gives the 32-bit physical entry point. PVH boot
 * ABI: 32-bit protected mode, paging off, flat CS/DS, interrupts off,
 * EBX = physical address of struct hvm_start_info.
 */
#include "asm.h"

#define XEN_ELFNOTE_PHYS32_ENTRY 18

	.section .note.Xen, "a", @note
	.balign	4
	.long	2f - 1f				/* namesz */
	.long	4f - 3f				/* descsz */
	.long	XEN_ELFNOTE_PHYS32_ENTRY	/* type */
1:	.asciz	"Xen"
2:	.balign	4
3:	.long	pvh_entry32
4:	.balign	4

	.section .text32, "ax"
	.code32
	.globl	pvh_entry32
pvh_entry32:
	cli
	cld
	lgdt	gdt_ptr
	ljmp	$SEL_CODE32, $1f
1:	LOAD_DATA_SEGMENTS
	/* EBX (start_info) survives: ENTER_LONG_MODE clobbers only eax, ecx, edx. */
	ENTER_LONG_MODE pvh_entry64

	.text
	.code64
pvh_entry64:
	movl	%ebx, %r13d			/* zero-extends */
	movl	$PROTO_PVH, %r12d
	jmp	common64

	.section .note.GNU-stack, "", @progbits
