/* PVH entry: 32-bit protected mode, paging off, EBX = struct hvm_start_info. */
#include "asm.h"

    PVH_ENTRY_NOTE pvh_start32

    .section .text.head, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, %ebp                 /* keep start_info */
    lgdt gdt_desc
    ljmp $SEL_CODE32, $1f
1:  movl $SEL_DATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    /* clear .bss (holds the page tables and the stack) */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $2, %ecx
    xorl %eax, %eax
    rep stosl
    movl $boot_stack_top, %esp
    call build_page_tables32
    ENTER_LONG_MODE pvh_start64

    .code64
pvh_start64:
    movl $SEL_DATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl $boot_stack_top, %esp
    xorl %edi, %edi
    movl %ebp, %edi                 /* zero-extended start_info */
    call pvh_main
2:  cli
    hlt
    jmp 2b
