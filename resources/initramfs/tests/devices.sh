# Lists the virtio devices, block devices and network interfaces the guest found.
echo "EMBER-TEST virtio=$(ls /sys/bus/virtio/devices 2>/dev/null | tr '\n' ' ')"
echo "EMBER-TEST block=$(ls /sys/class/block 2>/dev/null | tr '\n' ' ')"
echo "EMBER-TEST net=$(ls /sys/class/net 2>/dev/null | tr '\n' ' ')"
echo "EMBER-TEST vsock=$([ -c /dev/vsock ] && echo yes || echo no)"
