#!/bin/busybox sh
# Ember's default guest init script, /lib/ember/init.sh (busybox ash), run by /init (ember-init.c)
# once it has marked the boot timer, mounted /proc, /dev, /sys and /dev/pts and brought up the
# loopback interface. What it does depends on the kernel command line:
#   ember.test=NAME   runs /tests/NAME.sh, then ends the VM with the script's exit status
#   ember.cmd="CMD"   runs `sh -c "CMD"`, then ends the VM with its exit status
#   (neither)         an interactive shell on the console; the VM resets when it exits
#   ember.agent=1     also starts the guest agent (/bin/ember-agent, on vsock) in the background
#   ember.agent=job   job mode: the agent is all the guest runs (Ember sends the command over vsock);
#                     should it end, the VM ends with status 125
# The VM ends through Ember's debug-exit port (0xf4, via /bin/ember-exit): Ember exits with the
# status itself. Should that fail, `reboot -f` resets the VM (reboot=k: Ember exits 0).
# Markers on the console, for tests: "EMBER-INIT", "EMBER-EXIT status=N".
# Every process costs ~0.3-0.6 s on software KVM (each page fault and system call is emulated
# kernel code), so this script uses shell builtins wherever it can.
# Busybox runs its applets without a link per applet (its standalone shell, through /proc/self/exe).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=${TERM:-linux}

echo "EMBER-INIT"

. /lib/ember/cmdline.sh

# end_vm STATUS: reports STATUS and ends the VM with it.
end_vm() {
    echo "EMBER-EXIT status=$1"
    /bin/ember-exit "$1"
    echo "EMBER-EXIT debug-exit port failed, rebooting (exit status lost)"
    reboot -f
    while :; do sleep 1000; done
}

read -r cmdline </proc/cmdline
# cmdline_get sets $_value too; a redirected function call runs in this shell.
if cmdline_get ember.agent "$cmdline" >/dev/null; then
    case $_value in
        job)
            /bin/ember-agent
            echo "EMBER-ERROR the guest agent ended"
            end_vm 125
            ;;
        *) /bin/ember-agent & ;;
    esac
fi
cmdline_mode "$cmdline"
case $mode in
    test)
        if [ -f "/tests/$arg.sh" ]; then
            sh "/tests/$arg.sh"
            end_vm $?
        fi
        echo "EMBER-ERROR no test /tests/$arg.sh, have:" /tests/*.sh
        end_vm 127
        ;;
    cmd)
        sh -c "$arg"
        end_vm $?
        ;;
    error)
        echo "EMBER-ERROR $arg"
        end_vm 126
        ;;
    *)
        # A session leader with the console as its controlling terminal: job control, Ctrl-C.
        setsid cttyhack sh -l
        reboot -f
        while :; do sleep 1000; done
        ;;
esac
