/*
 * pio-floor GUEST.elf: the least a monitor can do per port-I/O exit, as a yardstick for
 * resources/bench/startup.py. It boots one of the start-up guests (resources/guests/bench/
 * startup.S: 32-bit protected mode, no paging) with nothing but KVM: one memory slot, one vCPU,
 * no irqchip, no threads. Each KVM_EXIT_IO goes straight back into KVM_RUN, except that a byte
 * written to COM1's data port is written to stdout (one write(2) each, as a monitor's console
 * does) and the i8042 reset (0xfe to port 0x64) ends the program with status 0. Whatever per-exit
 * cost remains is the kernel's: the floor every monitor stands on.
 *
 *   gcc -O2 -o pio-floor pio-floor.c
 */
#include <elf.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define RAM_SIZE (16UL << 20)
#define COM1_DATA 0x3f8
#define I8042_COMMAND 0x64
#define I8042_RESET 0xfe

static void die(const char *what)
{
	perror(what);
	exit(1);
}

/* Copies the ELF's PT_LOAD segments into guest RAM; returns the entry point. */
static uint64_t load_elf(const char *path, uint8_t *ram)
{
	struct stat st;
	int fd = open(path, O_RDONLY);
	if (fd < 0 || fstat(fd, &st) < 0)
		die(path);
	uint8_t *file = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	if (file == MAP_FAILED)
		die("mmap");
	const Elf64_Ehdr *eh = (const void *)file;
	if ((size_t)st.st_size < sizeof(*eh) || memcmp(eh->e_ident, ELFMAG, SELFMAG) ||
	    eh->e_ident[EI_CLASS] != ELFCLASS64 ||
	    eh->e_phoff + (uint64_t)eh->e_phnum * sizeof(Elf64_Phdr) > (uint64_t)st.st_size) {
		fprintf(stderr, "%s: not a 64-bit ELF\n", path);
		exit(1);
	}
	const Elf64_Phdr *ph = (const void *)(file + eh->e_phoff);
	for (int i = 0; i < eh->e_phnum; i++) {
		if (ph[i].p_type != PT_LOAD)
			continue;
		if (ph[i].p_paddr > RAM_SIZE || ph[i].p_memsz > RAM_SIZE - ph[i].p_paddr ||
		    ph[i].p_filesz > ph[i].p_memsz || ph[i].p_offset > (uint64_t)st.st_size ||
		    ph[i].p_filesz > (uint64_t)st.st_size - ph[i].p_offset) {
			fprintf(stderr, "%s: segment %d does not fit\n", path, i);
			exit(1);
		}
		memcpy(ram + ph[i].p_paddr, file + ph[i].p_offset, ph[i].p_filesz);
	}
	return eh->e_entry;
}

/* Flat 4 GiB segments for 32-bit protected mode, paging off: what the PVH entry expects. */
static void flat_protected_mode(int vcpu)
{
	struct kvm_sregs sregs;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	struct kvm_segment code = {
		.base = 0, .limit = 0xffffffff, .selector = 0x8, .type = 11, .present = 1,
		.dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1,
	};
	struct kvm_segment data = code;
	data.selector = 0x10;
	data.type = 3;
	sregs.cs = code;
	sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
	sregs.cr0 = 0x11; /* PE | ET */
	sregs.cr4 = 0;
	sregs.efer = 0;
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: pio-floor GUEST.elf\n");
		return 2;
	}
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("/dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	uint8_t *ram = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (ram == MAP_FAILED)
		die("mmap");
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = RAM_SIZE,
		.userspace_addr = (uint64_t)ram,
	};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION");
	uint64_t entry = load_elf(argv[1], ram);

	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (run_size < 0)
		die("KVM_GET_VCPU_MMAP_SIZE");
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");
	flat_protected_mode(vcpu);
	struct kvm_regs regs = { .rip = entry, .rflags = 0x2 };
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");

	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0)
			die("KVM_RUN");
		if (run->exit_reason != KVM_EXIT_IO) {
			fprintf(stderr, "pio-floor: unexpected exit %u\n", run->exit_reason);
			return 1;
		}
		if (run->io.direction != KVM_EXIT_IO_OUT || run->io.size != 1)
			continue;
		uint8_t byte = *((uint8_t *)run + run->io.data_offset);
		if (run->io.port == COM1_DATA && write(1, &byte, 1) != 1)
			die("write");
		if (run->io.port == I8042_COMMAND && byte == I8042_RESET)
			return 0;
	}
}
