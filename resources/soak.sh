#!/usr/bin/env bash
# Soak: several Linux guests at once, for a long time, each booting over and over to run the
# stress script (resources/initramfs/tests/stress.sh: concurrent streams of short-lived
# processes, disk I/O, network I/O when run as root, the vector-register isolation check), while
# a CPU hog keeps the host busy. Counts boots, guest processes and failures; keeps the console of
# every failed boot. It is what the suite's stress test (tests/linux_stress.rs) does once, for
# as long as you like.
#
#   resources/soak.sh [--minutes 30] [--guests 2] [--iterations 20] [--hogs N]
#
# --hogs: host processes spinning on a CPU (default: one per core). Output: one line per boot,
# then a summary (also in target/soak/summary.txt); failed boots' consoles in target/soak/.
# Exit status 0 when no boot failed.
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=30 guests=2 iterations=20 hogs=$(nproc)
while [ $# -gt 0 ]; do
    case $1 in
        --minutes) minutes=$2; shift 2 ;;
        --guests) guests=$2; shift 2 ;;
        --iterations) iterations=$2; shift 2 ;;
        --hogs) hogs=$2; shift 2 ;;
        *) echo "usage: $0 [--minutes M] [--guests G] [--iterations N] [--hogs H]" >&2; exit 2 ;;
    esac
done

resources/install-deps.sh
resources/build-guest.sh >/dev/null
cargo build --release -q
ember=$PWD/target/x86_64-unknown-linux-gnu/release/ember
cache=${XDG_CACHE_HOME:-$HOME/.cache}/ember/default
out=$PWD/target/soak
rm -rf "$out"
mkdir -p "$out"

net=no
if [ "$(id -u)" -eq 0 ]; then net=yes; fi
children=()
guest_pids=()
namespaces=()
cleanup() {
    for pid in "${guest_pids[@]}" "${children[@]}" $(cat "$out"/guest-*.pid 2>/dev/null); do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    for ns in "${namespaces[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
}
trap cleanup EXIT

for _ in $(seq 1 "$hogs"); do
    sh -c 'while :; do :; done' &
    children+=($!)
done

# guest G: boots until the deadline; one line per boot in $out/guest-G.log.
guest() {
    local g=$1 deadline=$2 boot=0 prefix=() extra=() cmd="sh /tests/stress.sh $iterations 2"
    local disk=$out/disk-$g.img
    truncate -s 4M "$disk"
    if [ "$net" = yes ]; then
        local ns=ember-soak-$$-$g
        prefix=(ip netns exec "$ns")
        extra=(--net tap=tap0)
        cmd="$cmd 10.0.2.1 10.0.2.2"
    fi
    while [ "$(date +%s)" -lt "$deadline" ]; do
        boot=$((boot + 1))
        local log=$out/guest-$g-boot-$boot.console start status
        start=$(date +%s)
        status=0
        timeout 3600 "${prefix[@]}" "$ember" run --kernel "$cache/vmlinux" --initrd "$cache/initramfs.cpio" \
            --cpus 2 --memory 256M --disk "path=$disk" "${extra[@]}" \
            --cmdline "console=ttyS0 reboot=k panic=-1 quiet tsc=reliable print-fatal-signals=1 loglevel=5 ember.cmd=\"$cmd\"" \
            >"$log" 2>&1 </dev/null &
        # timeout passes a SIGTERM from cleanup on to ember.
        echo $! >"$out/guest-$g.pid"
        wait $! || status=$?
        local processes
        processes=$(sed -n 's/^EMBER-TEST processes=\([0-9]*\).*/\1/p' "$log" | tr -d '\r')
        if [ "$status" -eq 0 ] && ! grep -q "=FAIL" "$log"; then
            echo "guest $g boot $boot: ok, ${processes:-?} processes, $(($(date +%s) - start)) s"
            rm -f "$log"
        else
            echo "guest $g boot $boot: FAILED (exit $status), console in $log"
        fi
    done >"$out/guest-$g.log"
}

deadline=$(($(date +%s) + minutes * 60))
if [ "$net" = yes ]; then
    mkdir -p "$out/www"
    head -c 65536 /dev/urandom >"$out/www/blob"
fi
for g in $(seq 1 "$guests"); do
    if [ "$net" = yes ]; then
        ns=ember-soak-$$-$g
        ip netns add "$ns"
        namespaces+=("$ns")
        ip netns exec "$ns" ip link set lo up
        ip netns exec "$ns" ip tuntap add tap0 mode tap
        ip netns exec "$ns" ip addr add 10.0.2.1/24 dev tap0
        ip netns exec "$ns" ip link set tap0 up
        ip netns exec "$ns" busybox httpd -f -p 10.0.2.1:8080 -h "$out/www" &
        children+=($!)
    fi
    guest "$g" "$deadline" &
    guest_pids+=($!)
done
echo "soak: $guests guests, $hogs CPU hogs, network: $net, for $minutes minutes (logs in $out)"
started=$(date +%s)
# Each guest ends after its last boot past the deadline; the hogs and servers run until cleanup.
wait "${guest_pids[@]}" || true
cat "$out"/guest-*.log
boots=$(cat "$out"/guest-*.log | wc -l)
failed=$(cat "$out"/guest-*.log | grep -c FAILED || true)
processes=$(sed -n 's/.*: ok, \([0-9]*\) processes.*/\1/p' "$out"/guest-*.log | awk '{ s += $1 } END { print s + 0 }')
summary="soak: $(( ($(date +%s) - started) / 60 )) minutes, $guests guests at once, $hogs CPU hogs, network $net: $boots boots, $processes guest processes in the boots that passed, $failed failed boots"
echo "$summary" | tee "$out/summary.txt"
[ "$failed" -eq 0 ]
