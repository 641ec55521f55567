/* The start-up benchmark guest (resources/bench/startup.py): the smallest PVH guest that shows
 * it ran. It stays in the 32-bit protected mode PVH starts it in (no page tables, no long mode,
 * no stack: on software KVM every guest kernel-mode instruction is emulated, so the guest does
 * as little as it can), writes PIO_COUNT bytes to COM1's scratch register (one port-I/O exit to
 * the monitor each), prints one line on COM1, then either resets through the i8042 (the monitor
 * exits) or, built with HOLD=1, halts forever with interrupts off (for measuring memory).
 * The same ELF boots under Ember and QEMU microvm. */

#ifndef PIO_COUNT
#define PIO_COUNT 0
#endif
#ifndef HOLD
#define HOLD 0
#endif

#define COM1_DATA    0x3f8
#define COM1_SCRATCH 0x3ff
#define I8042_CMD    0x64
#define I8042_RESET  0xfe

#include "asm.h"

    PVH_ENTRY_NOTE pvh_start32

    .section .text.head, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    /* PVH hands over flat 4 GiB segments: no GDT of our own is needed. */
#if PIO_COUNT > 0
    movl $PIO_COUNT, %ecx
    movw $COM1_SCRATCH, %dx
1:  outb %al, %dx
    decl %ecx
    jnz 1b
#endif
    /* One OUT per byte, as a UART driver writes (no `rep outsb`). */
    movl $line, %esi
    movl $line_len, %ecx
    movw $COM1_DATA, %dx
4:  lodsb
    outb %al, %dx
    decl %ecx
    jnz 4b
#if HOLD
2:  cli
    hlt
    jmp 2b
#else
    movb $I8042_RESET, %al
    outb %al, $I8042_CMD
3:  hlt
    jmp 3b
#endif

    .section .rodata
line:
    .ascii "ember-startup: guest up\n"
    .set line_len, . - line
