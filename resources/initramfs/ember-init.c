/*
 * ember-init: the guest's /init. It marks "userspace reached" on Ember's boot timer (one byte,
 * 0x60, written to I/O port 0x80: Ember logs the time since it started; under another monitor
 * the write goes nowhere), mounts /proc, /dev, /sys and /dev/pts, brings the loopback interface
 * up, then becomes the real init, the busybox shell script /lib/ember/init.sh, with the same
 * arguments and environment.
 *
 * A binary rather than lines of the script: each process (mount, mkdir, ip) costs ~0.6 s of
 * emulated kernel work on software KVM, and these are a handful of system calls. A step that
 * fails is reported and skipped: the shell still starts.
 */
#include "freestanding.h"

#define BOOT_TIMER_PORT 0x80
#define MARK_USERSPACE 0x60
#define MAX_ARGS 64

#define AF_INET 2
#define SOCK_DGRAM 2
#define SIOCGIFFLAGS 0x8913
#define SIOCSIFFLAGS 0x8914
#define IFF_UP 0x1

/* struct ifreq: the interface name, then a union whose first short is ifr_flags. */
struct ifreq {
	char name[16];
	short flags;
	char pad[22];
};

static void report(const char *verb, const char *what, long err)
{
	if (err < 0) {
		put(2, "ember-init: cannot ");
		put(2, verb);
		put(2, what);
		put(2, "\n");
	}
}

static void mount_fs(const char *type, const char *target, const char *options)
{
	report("mount ", target, sys6(SYS_mount, (long)type, (long)target, (long)type, 0, (long)options, 0));
}

static void loopback_up(void)
{
	struct ifreq ifr = { .name = "lo" };
	long fd = sys3(SYS_socket, AF_INET, SOCK_DGRAM, 0);
	long err = fd;

	if (fd >= 0) {
		err = sys3(SYS_ioctl, fd, SIOCGIFFLAGS, &ifr);
		if (err == 0) {
			ifr.flags |= IFF_UP;
			err = sys3(SYS_ioctl, fd, SIOCSIFFLAGS, &ifr);
		}
		sys3(SYS_close, fd, 0, 0);
	}
	report("bring up ", "lo", err);
}

static __attribute__((used, noreturn)) void cmain(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	char **envp = argv + argc + 1;
	const char *args[MAX_ARGS + 3] = { "sh", "/lib/ember/init.sh" };
	long i;

	if (sys3(SYS_ioperm, BOOT_TIMER_PORT, 1, 1) == 0)
		outb(BOOT_TIMER_PORT, MARK_USERSPACE);

	mount_fs("proc", "/proc", 0);
	mount_fs("devtmpfs", "/dev", 0);
	mount_fs("sysfs", "/sys", 0);
	/* On the devtmpfs just mounted; / itself is the initramfs' tmpfs, so /tmp needs no mount. */
	report("create ", "/dev/pts", sys3(SYS_mkdir, "/dev/pts", 0755, 0));
	report("create ", "/dev/shm", sys3(SYS_mkdir, "/dev/shm", 01777, 0));
	mount_fs("devpts", "/dev/pts", "gid=5,mode=620,ptmxmode=666");
	loopback_up();

	/* The kernel passes init the command line words it did not consume. */
	for (i = 1; i < argc && i <= MAX_ARGS; i++)
		args[i + 1] = argv[i];
	args[i + 1] = 0;
	sys3(SYS_execve, "/bin/busybox", args, envp);
	put(2, "ember-init: cannot run /bin/busybox sh /lib/ember/init.sh\n");
	quit(1);
}
