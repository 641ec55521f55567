/* Linux x86-64 boot protocol entry (also the bzImage payload): 64-bit mode,
 * RSI = struct boot_params. The image is linked at 1 MiB; the 64-bit entry
 * is at load address + 0x200 as for a bzImage's startup_64. */
#include "asm.h"

    .section .text.head, "ax"
    .code32
    .globl startup_32
startup_32:                         /* the 32-bit bzImage entry is not supported */
    ud2
1:  hlt
    jmp 1b

    .org 0x200
    .code64
    .globl startup_64
startup_64:
    cli
    cld
    movq %rsi, %r15                 /* keep boot_params */
    movl $boot_stack_top, %esp
    lgdt gdt_desc
    pushq $SEL_CODE64
    pushq $1f
    lretq
1:  movl $SEL_DATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $3, %ecx
    xorl %eax, %eax
    rep stosq
    movl $boot_stack_top, %esp
    call build_page_tables64
    movl $pml4, %eax
    movq %rax, %cr3
    movq %r15, %rdi
    call linux64_main
2:  cli
    hlt
    jmp 2b
