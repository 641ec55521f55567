# The guest half of resources/bench/bench.py (run as ember.cmd="sh /tests/bench.sh ..."):
#   sh /tests/bench.sh PARTS DISK_MIB RAND_SECS PINGS NET_MIB
# PARTS is "disk", "net" or "disk,net".
#   disk: O_DIRECT sequential write (then flush) and read of DISK_MIB MiB of /dev/vda, then 4 KiB
#         random reads within them for RAND_SECS seconds (ember-bench).
#   net:  eth0 = 10.0.2.2/24; PINGS pings of the host (10.0.2.1), then an HTTP GET of /blob from
#         the host's httpd on port 8080 (host -> guest, timed in the guest), then serves NET_MIB MiB
#         on port 8081 to one HTTP client (guest -> host: the host fetches and times it).
# Results are "EMBER-BENCH key=value" lines; the exit status is 0 when every step worked.
parts=$1 mib=$2 secs=$3 pings=$4 net_mib=$5
status=0
step() { # NAME CMD...: runs CMD, notes a failure
    _n=$1
    shift
    "$@" || {
        echo "EMBER-BENCH error=$_n"
        status=1
    }
}
case ",$parts," in *,disk,*)
    step write ember-bench write /dev/vda "$mib"
    step read ember-bench read /dev/vda "$mib"
    step randread ember-bench randread /dev/vda "$mib" "$secs"
    ;;
esac
case ",$parts," in *,net,*)
    step ip ip addr add 10.0.2.2/24 dev eth0
    step link ip link set eth0 up
    # The first ping resolves the host's MAC; it is not counted.
    ping -c 1 -W 10 10.0.2.1 >/dev/null || echo "EMBER-BENCH warning=first-ping-lost"
    ping -c "$pings" -i 0.2 -W 5 10.0.2.1 >/tmp/ping.txt || status=1
    while read -r line; do
        case $line in
            *packets\ transmitted*) echo "EMBER-BENCH ping_summary=$line" ;;
            round-trip*) echo "EMBER-BENCH ping_rtt_ms=${line#*= }" ;;
        esac
    done </tmp/ping.txt
    step rx ember-bench get 10.0.2.1 8080 /blob net_rx
    step tx ember-bench serve 8081 "$net_mib"
    ;;
esac
exit $status
