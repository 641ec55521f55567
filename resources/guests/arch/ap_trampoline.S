/* SMP application-processor trampoline. Copied to 0x8000 by the smp guest;
 * a SIPI with vector 0x08 starts the AP here in real mode (CS=0x0800, IP=0).
 * Path: real mode -> 32-bit protected mode -> long mode (the BSP's page
 * tables) -> ap_main() on a per-AP stack. */
#include "asm.h"

#define TRAMP_BASE 0x8000
#define T(x) ((x) - ap_trampoline_start + TRAMP_BASE)

    .section .rodata
    .globl ap_trampoline_start, ap_trampoline_end
    .code16
ap_trampoline_start:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl T(tramp_gdt_desc)
    movl %cr0, %eax
    orl $1, %eax                    /* CR0.PE */
    movl %eax, %cr0
    ljmpl $SEL_CODE32, $T(tramp32)
    .code32
tramp32:
    ljmp $SEL_CODE32, $ap_entry32   /* continue in the kernel image */
    .balign 8
tramp_gdt_desc:
    .word 4 * 8 - 1
    .long gdt
ap_trampoline_end:

    .text
    .code32
ap_entry32:
    movl $SEL_DATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    ENTER_LONG_MODE ap_entry64

    .code64
ap_entry64:
    movl $SEL_DATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    /* take a stack: spin on ap_stack_lock with xchg (no `pause`, no xadd) */
1:  movl $1, %eax
    xchgl %eax, ap_stack_lock(%rip)
    testl %eax, %eax
    jnz 1b
    movq ap_next_stack(%rip), %rsp
    subq $AP_STACK_SIZE, ap_next_stack(%rip)
    movl $0, ap_stack_lock(%rip)
    call ap_main
2:  cli
    hlt
    jmp 2b
