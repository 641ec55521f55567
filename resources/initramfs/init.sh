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
#   ember.image=DEV   the root for commands is an overlay: DEV (a read-only ext4 image) below a
#                     writable layer (tmpfs, or ember.scratch=DEV, an ext4 disk); commands, the
#                     shell and the agent's commands run chrooted into it (the initramfs stays /)
#   ember.volumes=TAG=PATH[:ro],…   virtio-fs shares mounted at PATH (inside the image if any);
#                     one at / is the root for commands, as an image would be (at /mnt/root)
#   ember.files=TAG/NAME=PATH[:ro],…   the file NAME of the share TAG (mounted out of sight, at
#                     /run/ember/files/TAG) bound over PATH (inside the root for commands)
#   ember.net=NAME:ADDRESS/PREFIX:GATEWAY:MTU,…   the agent configures these interfaces first
#   ember.hostname=NAME                           and sets this host name
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

# mount_image DEV: the overlay root at /mnt/root, with /proc, /sys and /dev inside it.
mount_image() {
    mkdir -p /mnt/lower /mnt/rw /mnt/root
    mount -t ext4 -o ro "$1" /mnt/lower || return 1
    if cmdline_get ember.scratch "$cmdline" >/dev/null; then
        mount -t ext4 "$_value" /mnt/rw || return 1
    else
        mount -t tmpfs -o mode=0755 scratch /mnt/rw || return 1
    fi
    mkdir -p /mnt/rw/upper /mnt/rw/work
    mount -t overlay root -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work \
        /mnt/root || return 1
    mkdir -p /mnt/root/proc /mnt/root/sys /mnt/root/dev /mnt/root/tmp
    mount -t proc proc /mnt/root/proc && mount -t sysfs sys /mnt/root/sys &&
        mount -o rbind /dev /mnt/root/dev
}

# mount_volumes LIST: TAG=PATH[:ro],… as virtio-fs mounts under $root; the one at / (first,
# wherever it is listed) becomes $root itself.
mount_volumes() {
    for _pass in root others; do
        _list=$1,
        while [ -n "$_list" ]; do
            _item=${_list%%,*}
            _list=${_list#*,}
            [ -n "$_item" ] || continue
            _tag=${_item%%=*}
            _path=${_item#*=}
            _opts=rw
            case $_path in *:ro) _opts=ro _path=${_path%:ro} ;; esac
            case $_pass/$_path in
                root//) mount_root_volume "$_tag" "$_opts" || return 1 ;;
                root/* | others//) ;;
                *) mkdir -p "$root$_path" && mount -t virtiofs -o "$_opts" "$_tag" "$root$_path" ||
                    return 1 ;;
            esac
        done
    done
}

# mount_root_volume TAG OPTS: the share TAG as the root for commands, at /mnt/root, with /proc,
# /sys and /dev inside it (a read-only root must have those directories already).
mount_root_volume() {
    mkdir -p /mnt/root && mount -t virtiofs -o "$2" "$1" /mnt/root || return 1
    for _dir in proc sys dev; do
        [ -d "/mnt/root/$_dir" ] || mkdir "/mnt/root/$_dir" || return 1
    done
    mount -t proc proc /mnt/root/proc && mount -t sysfs sys /mnt/root/sys &&
        mount -o rbind /dev /mnt/root/dev || return 1
    root=/mnt/root
}

# mount_files LIST: TAG/NAME=PATH[:ro],… each file bound over $root$PATH, made if missing (a
# file the root lacks and cannot have is left out, with a warning on the console).
mount_files() {
    _list=$1,
    while [ -n "$_list" ]; do
        _item=${_list%%,*}
        _list=${_list#*,}
        [ -n "$_item" ] || continue
        _source=${_item%%=*}
        _path=${_item#*=}
        _tag=${_source%%/*}
        _opts=rw
        case $_path in *:ro) _opts=ro _path=${_path%:ro} ;; esac
        # A bind of a file keeps its share's read-only flag.
        if [ ! -d "/run/ember/files/$_tag" ]; then
            mkdir -p "/run/ember/files/$_tag" &&
                mount -t virtiofs -o "$_opts" "$_tag" "/run/ember/files/$_tag" || return 1
        fi
        _target=$root$_path
        if [ ! -e "$_target" ]; then
            [ -d "${_target%/*}" ] || mkdir -p "${_target%/*}"
            : 2>/dev/null >"$_target"
        fi
        if [ -f "$_target" ]; then
            mount -o bind "/run/ember/files/$_source" "$_target" || return 1
        else
            echo "EMBER-WARNING no file $_path in the root to bind over"
        fi
    done
}

# in_root CMD...: runs CMD in the image's root when there is one.
in_root() {
    if [ "$root" = / ]; then "$@"; else chroot "$root" "$@"; fi
}

read -r cmdline </proc/cmdline
root=/
# cmdline_get sets $_value too; a redirected function call runs in this shell.
if cmdline_get ember.image "$cmdline" >/dev/null; then
    if ! mount_image "$_value"; then
        echo "EMBER-ERROR cannot mount the image on $_value"
        end_vm 125
    fi
    root=/mnt/root
fi
if cmdline_get ember.volumes "$cmdline" >/dev/null; then
    if ! mount_volumes "$_value"; then
        echo "EMBER-ERROR cannot mount the volumes $_value"
        end_vm 125
    fi
fi
if cmdline_get ember.files "$cmdline" >/dev/null; then
    if ! mount_files "$_value"; then
        echo "EMBER-ERROR cannot bind the files $_value"
        end_vm 125
    fi
fi
if cmdline_get ember.agent "$cmdline" >/dev/null; then
    agent_mode=$_value
    agent_args=
    [ "$root" = / ] || agent_args="--root $root"
    # Checked by the agent; Ember writes them without spaces.
    cmdline_get ember.net "$cmdline" >/dev/null && agent_args="$agent_args --net $_value"
    cmdline_get ember.hostname "$cmdline" >/dev/null && agent_args="$agent_args --hostname $_value"
    case $agent_mode in
        job)
            # shellcheck disable=SC2086 # options and their values, split on purpose
            /bin/ember-agent $agent_args
            echo "EMBER-ERROR the guest agent ended"
            end_vm 125
            ;;
        # shellcheck disable=SC2086
        *) /bin/ember-agent $agent_args & ;;
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
        in_root sh -c "$arg"
        end_vm $?
        ;;
    error)
        echo "EMBER-ERROR $arg"
        end_vm 126
        ;;
    *)
        # A session leader with the console as its controlling terminal: job control, Ctrl-C.
        if [ "$root" = / ]; then
            setsid cttyhack sh -l
        else
            setsid cttyhack chroot "$root" sh -l
        fi
        reboot -f
        while :; do sleep 1000; done
        ;;
esac
