# Prints what the guest sees of its machine, one "EMBER-TEST key=value" line each (shell builtins
# where possible: every process costs here).
read -r online </sys/devices/system/cpu/online
cpus=0
for cpu in /sys/devices/system/cpu/cpu[0-9]*; do cpus=$((cpus + 1)); done
while read -r key value unit; do
    [ "$key" = MemTotal: ] && break
done </proc/meminfo
read -r uptime idle </proc/uptime
read -r release </proc/sys/kernel/osrelease
read -r clocksource </sys/devices/system/clocksource/clocksource0/current_clocksource
read -r cmdline </proc/cmdline
echo "EMBER-TEST cpus=$cpus"
echo "EMBER-TEST online=$online"
echo "EMBER-TEST memtotal_kib=$value"
echo "EMBER-TEST kernel=$release"
echo "EMBER-TEST clocksource=$clocksource"
echo "EMBER-TEST uptime=$uptime"
echo "EMBER-TEST cmdline=$cmdline"
