/* Assembly helpers shared by the entry stubs. */
#define SEL_CODE32 0x08
#define SEL_DATA   0x10
#define SEL_CODE64 0x18

/* XEN_ELFNOTE_PHYS32_ENTRY (18): the note that makes an ELF a PVH kernel, naming its 32-bit
 * physical entry point. */
.macro PVH_ENTRY_NOTE entry
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4                         /* namesz: "Xen\0" */
    .long 4                         /* descsz */
    .long 18                        /* type: XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long \entry
    .balign 4
    .popsection
.endm

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
