/*
 * ember-init: the guest's /init. It marks "userspace reached" on Ember's boot timer (one byte,
 * 0x60, written to I/O port 0x80: Ember logs the time since it started; under another monitor
 * the write goes nowhere), then becomes the real init, the busybox shell script
 * /lib/ember/init.sh, with the same arguments and environment.
 *
 * A binary rather than a line of the script: it runs before the first busybox process exists,
 * and an extra process would cost ~0.3 s of emulated kernel work on software KVM.
 */
#include "freestanding.h"

#define BOOT_TIMER_PORT 0x80
#define MARK_USERSPACE 0x60
#define MAX_ARGS 64

static __attribute__((used, noreturn)) void cmain(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	char **envp = argv + argc + 1;
	const char *args[MAX_ARGS + 3] = { "sh", "/lib/ember/init.sh" };
	long i;

	if (sys3(SYS_ioperm, BOOT_TIMER_PORT, 1, 1) == 0)
		outb(BOOT_TIMER_PORT, MARK_USERSPACE);
	/* The kernel passes init the command line words it did not consume. */
	for (i = 1; i < argc && i <= MAX_ARGS; i++)
		args[i + 1] = argv[i];
	args[i + 1] = 0;
	sys3(SYS_execve, "/bin/busybox", args, envp);
	put(2, "ember-init: cannot run /bin/busybox sh /lib/ember/init.sh\n");
	quit(1);
}
