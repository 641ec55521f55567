/* Shared low-level pieces: GDT, identity page tables (first 4 GiB, 2 MiB
 * pages), the boot stack, and the long-mode switch used by the PVH entry
 * and the SMP trampoline. */
#include "asm.h"

    .section .rodata
    .balign 16
    .globl gdt
gdt:
    .quad 0                         /* null */
    .quad 0x00cf9a000000ffff        /* 0x08: 32-bit code, flat */
    .quad 0x00cf92000000ffff        /* 0x10: data, flat */
    .quad 0x00af9a000000ffff        /* 0x18: 64-bit code */
gdt_end:
    .balign 8
    .globl gdt_desc
gdt_desc:                           /* 10 bytes: works for lgdt in 32- and 64-bit mode */
    .word gdt_end - gdt - 1
    .quad gdt

    .section .bss
    .balign 4096
    .globl pml4
pml4:   .skip 4096
pdpt:   .skip 4096
pds:    .skip 4 * 4096

    /* stacks need no clearing: .noinit lies after __bss_end */
    .section .noinit, "aw", @nobits
    .balign 16
boot_stack: .skip 16384
    .globl boot_stack_top
boot_stack_top:

    .text
/* build_page_tables32: 32-bit, clobbers eax, ecx, edx, edi. The tables must
 * already be zero (bss cleared). */
    .code32
    .globl build_page_tables32
build_page_tables32:
    movl $pdpt + 0x03, pml4
    movl $pds + 0x03, %eax
    xorl %ecx, %ecx
1:  movl %eax, pdpt(,%ecx,8)
    addl $4096, %eax
    incl %ecx
    cmpl $4, %ecx
    jb 1b
    xorl %ecx, %ecx
    movl $0x83, %eax                /* present | writable | 2 MiB page */
2:  movl %eax, %edx
    cmpl $1536, %ecx                /* 3-4 GiB: MMIO hole, uncached */
    jb 3f
    orl $0x18, %edx                 /* PWT | PCD */
3:  movl %edx, pds(,%ecx,8)
    addl $0x200000, %eax
    incl %ecx
    cmpl $2048, %ecx
    jb 2b
    ret

/* Same thing from 64-bit mode (Linux 64-bit boot protocol entry). */
    .code64
    .globl build_page_tables64
build_page_tables64:
    movl $pdpt + 0x03, pml4(%rip)
    movl $pds + 0x03, %eax
    xorl %ecx, %ecx
    leaq pdpt(%rip), %rdi
1:  movl %eax, (%rdi,%rcx,8)
    addl $4096, %eax
    incl %ecx
    cmpl $4, %ecx
    jb 1b
    xorl %ecx, %ecx
    movl $0x83, %eax
    leaq pds(%rip), %rdi
2:  movl %eax, %edx
    cmpl $1536, %ecx
    jb 3f
    orl $0x18, %edx
3:  movl %edx, (%rdi,%rcx,8)
    addl $0x200000, %eax
    incl %ecx
    cmpl $2048, %ecx
    jb 2b
    ret
