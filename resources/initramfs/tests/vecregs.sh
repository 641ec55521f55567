# Vector-register isolation: three processes at once (more than the test VM's vCPUs, so they take
# turns on a CPU) each load their own values into every vector, opmask and PKRU register, yield,
# and check them; meanwhile new programs check that they start with none of those values.
# Usage: vecregs.sh [ROUNDS] [FRESH]. Prints "EMBER-TEST vecregs=ok" and exits 0 when no process
# saw a wrong value, else prints each failure and exits 1.
rounds=${1:-300}
fresh=${2:-20}
fail=0
pids=
for id in 1 2 3; do
    ember-vecregs hold "$id" "$rounds" 2 >"/tmp/vecregs.$id" &
    pids="$pids $!"
done
i=0
while [ "$i" -lt "$fresh" ]; do
    ember-vecregs fresh >/tmp/vecregs.fresh || { fail=1; cat /tmp/vecregs.fresh; }
    i=$((i + 1))
done
id=1
for pid in $pids; do
    wait "$pid" || fail=1
    cat "/tmp/vecregs.$id"
    id=$((id + 1))
done
tail -n 1 /tmp/vecregs.fresh
if [ "$fail" = 0 ]; then echo "EMBER-TEST vecregs=ok"; else echo "EMBER-TEST vecregs=FAIL"; fi
exit "$fail"
