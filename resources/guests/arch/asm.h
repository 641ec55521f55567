/* Assembly helpers shared by the entry stubs. */
#define SEL_CODE32 0x08
#define SEL_DATA   0x10
#define SEL_CODE64 0x18

/* From 32-bit protected mode with flat segments and page tables built:
 * enable PAE + long mode + paging and far-jump to a 64-bit label. */
.macro ENTER_LONG_MODE target
    movl $pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax                 /* CR4.PAE */
    movl %eax, %cr4
    movl $0xc0000080, %ecx          /* IA32_EFER */
    rdmsr
    orl $0x100, %eax                /* EFER.LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax           /* CR0.PG | CR0.PE */
    movl %eax, %cr0
    ljmp $SEL_CODE64, $\target
.endm
