/* Linker script for all guests; preprocessed with -DPVH or -DBZIMAGE.
 * Everything is loaded at 1 MiB (one RWX PT_LOAD, no headers mapped). */
OUTPUT_FORMAT("elf64-x86-64")
OUTPUT_ARCH(i386:x86-64)
#ifdef PVH
ENTRY(pvh_start32)
#else
ENTRY(startup_64)
#endif

PHDRS {
#ifdef BZIMAGE
    setup PT_LOAD;
#endif
    text PT_LOAD FLAGS(7);
#ifdef PVH
    note PT_NOTE;
#endif
}

SECTIONS {
#ifdef BZIMAGE
    /* The real-mode setup sectors (boot sector + header); cut out with objcopy. */
    . = 0;
    .bzsetup : { KEEP(*(.bzsetup)) } :setup
#endif
    . = 0x100000;
    _image_start = .;
    .text.head : { KEEP(*(.text.head)) } :text
    .text : { *(.text .text.*) } :text
    .rodata : { *(.rodata .rodata.*) } :text
#ifdef PVH
    .note.Xen : { KEEP(*(.note.Xen)) } :text :note
#endif
    .data : { *(.data .data.*) } :text
    . = ALIGN(16);
    _edata = .;
    .bss : {
        __bss_start = .;
        *(.bss .bss.*) *(COMMON)
        . = ALIGN(16);
        __bss_end = .;
    } :text
    .noinit (NOLOAD) : { *(.noinit .noinit.*) . = ALIGN(16); } :text
    _end = .;

#ifdef BZIMAGE
    _bz_syssize = (_edata - _image_start + 15) / 16;
    _bz_init_size = ALIGN(_end - _image_start, 4096);
#endif

    /DISCARD/ : { *(.note.GNU-stack) *(.note.gnu.*) *(.comment) *(.eh_frame*) *(.note) }
}
