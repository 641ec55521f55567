# Exercises what a userland needs from the kernel: fork/exec, pipes, signals (a handler run on
# the way back from a system call), files on tmpfs, a pty, time. Prints "EMBER-TEST userland=ok"
# and exits 0 when all work, else names the first failure and exits 1.
fail() { echo "EMBER-TEST userland=FAIL $*"; exit 1; }
[ "$(echo hello | tr a-z A-Z | rev)" = OLLEH ] || fail pipe
got=
trap 'got=usr1' USR1
kill -USR1 $$
[ "$got" = usr1 ] || fail signal
sleep 5 & pid=$!
kill $pid; wait $pid; [ $? = 143 ] || fail "kill+wait"
(exit 7); [ $? = 7 ] || fail "subshell status"
echo data >/tmp/f && [ "$(cat /tmp/f)" = data ] || fail tmpfs
[ -c /dev/ptmx ] && [ -d /dev/pts ] || fail pty
t0=$(date +%s); [ "$t0" -gt 1600000000 ] || fail "wall clock ($t0)"
[ "$(seq 1 1000 | awk '{ s += $1 } END { print s }')" = 500500 ] || fail awk
echo "EMBER-TEST userland=ok"
