#!/bin/sh
# Host-side tests of /init's command line parsing (lib/cmdline.sh), run with every POSIX shell
# at hand, busybox's ash first (the one /init runs with). Exit status 0 when all pass.
set -u
here=$(cd "$(dirname "$0")" && pwd)

run_with() {
    sh_cmd=$1
    # shellcheck disable=SC2016
    $sh_cmd -c '
        . "$1/lib/cmdline.sh"
        pass=0 fail=0
        check() { # WANT CMDLINE
            cmdline_mode "$2"; got="$mode${arg:+ $arg}"
            [ "$mode" = error ] && got="error $arg"
            if [ "$got" = "$1" ]; then pass=$((pass + 1)); else
                fail=$((fail + 1)); printf "FAIL: cmdline [%s]: want [%s], got [%s]\n" "$2" "$1" "$got"; fi
        }
        check_get() { # WANT-STATUS WANT-VALUE NAME CMDLINE
            got=$(cmdline_get "$3" "$4"); st=$?
            if [ "$st" = "$1" ] && [ "$got" = "$2" ]; then pass=$((pass + 1)); else
                fail=$((fail + 1)); printf "FAIL: get %s in [%s]: want %s [%s], got %s [%s]\n" "$3" "$4" "$1" "$2" "$st" "$got"; fi
        }
        check shell "console=ttyS0 reboot=k panic=-1 quiet"
        check shell ""
        check "test info" "console=ttyS0 ember.test=info quiet"
        check "test info" "ember.test=info"
        check "test exit42" "console=ttyS0 ember.test=info ember.test=exit42"
        check "test a.b_c-1" "ember.test=a.b_c-1 noxsave"
        check "error bad test name: ../x" "ember.test=../x"
        check "error bad test name: a/b" "ember.test=a/b"
        check "error bad test name: " "ember.test="
        check "error bad test name: a b" "ember.test=\"a b\""
        check shell "xember.test=info ember.testing=1"
        check "cmd echo hi" "console=ttyS0 ember.cmd=\"echo hi\" quiet"
        check "cmd uname" "ember.cmd=uname"
        check "cmd echo  two   spaces" "ember.cmd=\"echo  two   spaces\""
        check "cmd echo a=b" "ember.cmd=\"echo a=b\" x=1"
        check "cmd printf \"%s\\n\" x" "ember.cmd=\"printf \"%s\\n\" x\""
        check "test info" "ember.cmd=true ember.test=info"
        check "error empty ember.cmd" "ember.cmd="
        check "cmd echo tab" "	ember.cmd=\"echo tab\"	"
        check_get 0 "ttyS0" console "console=ttyS0 quiet"
        check_get 1 "" quiet "console=ttyS0 quiet"
        check_get 0 "" root "root= quiet"
        check_get 0 "b c" a "\"a=b c\" d"
        check_get 0 "2" a "a=1 a=2"
        check_get 0 "x y" a "a=\"x y\""
        check_get 1 "" a ""
        echo "$pass passed, $fail failed"
        [ "$fail" = 0 ]
    ' test-init "$here"
}

status=0
ran=0
for shell in "busybox sh" dash bash; do
    command -v "${shell%% *}" >/dev/null 2>&1 || continue
    printf '%s: ' "$shell"
    run_with "$shell" || status=1
    ran=$((ran + 1))
done
[ "$ran" -gt 0 ] || { echo "no shell to test with"; exit 1; }
exit $status
