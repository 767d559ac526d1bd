#!/bin/sh
# kickvm guest /init (busybox sh).
# Kernel command line:
#   kickvm.ip=ADDR/LEN   eth0 address (default 10.0.2.15/24)
#   kickvm.gw=ADDR       default route (none by default)
#   kickvm.cmd=BASE64    test script to run
# or a virtio-blk disk whose first line is "#kickvm-script" holds the script.
# Markers on the console: KICKVM-INIT-START, KICKVM-SCRIPT-START,
# KICKVM-EXIT-STATUS=<n>. Without a script: an interactive shell.
# The marker says /init has started: first, before the ~300 applet links
# and the mounts (under the rig's TCG they take ~0.5 s).
/bin/busybox echo KICKVM-INIT-START
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts
mount -t tmpfs tmp /tmp

for m in $(cat /etc/kickvm/modules); do
    insmod /lib/modules/$m.ko 2>/dev/null || echo "kickvm: insmod $m failed"
done
mdev -s

ip=10.0.2.15/24 gw= cmd=
for arg in $(cat /proc/cmdline); do
    case $arg in
    kickvm.ip=*) ip=${arg#kickvm.ip=} ;;
    kickvm.gw=*) gw=${arg#kickvm.gw=} ;;
    kickvm.cmd=*) cmd=${arg#kickvm.cmd=} ;;
    esac
done
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    ip addr add "$ip" dev eth0 && ip link set eth0 up
    [ -n "$gw" ] && ip route add default via "$gw"
fi

script=/tmp/kickvm-script
if [ -n "$cmd" ]; then
    echo "$cmd" | base64 -d > $script
else
    for disk in /dev/vd?; do
        [ "$(head -c 14 "$disk" 2>/dev/null)" = "#kickvm-script" ] || continue
        tr -d '\000' < "$disk" > $script
        break
    done
fi

if [ -s $script ]; then
    echo KICKVM-SCRIPT-START
    (cd / && sh $script)
    echo "KICKVM-EXIT-STATUS=$?"
else
    echo "KICKVM-SHELL: no script given; exit the shell to power off"
    setsid cttyhack sh -l
fi
sync
poweroff -f
