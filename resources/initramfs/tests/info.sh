# Prints what the guest sees of its machine, one "EMBER-TEST key=value" line each.
echo "EMBER-TEST cpus=$(nproc)"
echo "EMBER-TEST online=$(cat /sys/devices/system/cpu/online)"
echo "EMBER-TEST memtotal_kib=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)"
echo "EMBER-TEST kernel=$(uname -r)"
echo "EMBER-TEST clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
echo "EMBER-TEST uptime=$(cut -d' ' -f1 /proc/uptime)"
echo "EMBER-TEST cmdline=$(cat /proc/cmdline)"
