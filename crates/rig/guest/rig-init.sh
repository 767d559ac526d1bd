#!/bin/sh
# kickvm rig L1 /init (busybox sh): load 9p + kvm-amd, chroot into the
# host's root (read-only over 9p) and run the command the rig wrote to
# $scratch/cmd.sh, with its output and exit status going back through the
# read-write scratch share. Kernel command line:
#   kickvm.scratch=PATH   host path of the scratch share (tag "scratch")
#   kickvm.shares=P1,P2   more read-write host paths (tags share0, share1...)
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo KICKVM-RIG-L1-START
for m in $(cat /etc/kickvm/modules); do
    insmod /lib/modules/$m.ko 2>/dev/null || echo "kickvm-rig: insmod $m failed"
done

scratch= shares= shmem_thp=
for arg in $(cat /proc/cmdline); do
    case $arg in
    kickvm.scratch=*) scratch=${arg#kickvm.scratch=} ;;
    kickvm.shares=*) shares=${arg#kickvm.shares=} ;;
    kickvm.shmem_thp=*) shmem_thp=${arg#kickvm.shmem_thp=} ;;
    esac
done

# Transparent huge pages stay as Debian ships them (enabled=always,
# shmem_enabled=never), unless the rig was asked otherwise
# (KICKVM_RIG_SHMEM_THP=advise on the host, for a benchmark that reports both).
thp=/sys/kernel/mm/transparent_hugepage
if [ -n "$shmem_thp" ]; then
    echo "$shmem_thp" > $thp/shmem_enabled || echo "kickvm-rig: cannot set $thp/shmem_enabled to $shmem_thp"
fi
echo "KICKVM-RIG-THP enabled: $(cat $thp/enabled 2>/dev/null); shmem_enabled: $(cat $thp/shmem_enabled 2>/dev/null)"

p9="trans=virtio,version=9p2000.L,msize=262144"
h=/mnt/host
mkdir -p $h
mount -t 9p -o $p9,ro,cache=loose hostroot $h || { echo "kickvm-rig: cannot mount host root"; poweroff -f; }
mount -t proc proc $h/proc
mount -t sysfs sys $h/sys
mount -t devtmpfs dev $h/dev
mkdir -p $h/dev/pts $h/dev/shm
mount -t devpts devpts $h/dev/pts
mount -t tmpfs shm $h/dev/shm
mount -t tmpfs tmp $h/tmp
mount -t tmpfs run $h/run
# Read-write shares appear at their host paths (mkdir works when the path
# is under the tmpfs /tmp or /run; otherwise the directory already exists).
mkdir -p "$h$scratch" && mount -t 9p -o $p9 scratch "$h$scratch"
i=0
for s in $(echo "$shares" | tr , ' '); do
    mkdir -p "$h$s" && mount -t 9p -o $p9 share$i "$h$s"
    i=$((i + 1))
done

echo KICKVM-RIG-CMD-START
touch "$h$scratch/started"
chroot $h /bin/sh "$scratch/cmd.sh" > "$h$scratch/stdout" 2> "$h$scratch/stderr"
echo $? > "$h$scratch/status"
echo "KICKVM-EXIT-STATUS=$(cat $h$scratch/status)"
sync
poweroff -f
