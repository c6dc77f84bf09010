#!/bin/bash
# Runs as PID 1 inside the lane's VM (see lane.sh): mount the kernel file
# systems, run the contract suite with the system python3, print the result
# marker the lane looks for, power off.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
# The checkout may live under /tmp (CI clones anywhere): keep it reachable at
# /mnt/policyd before /tmp becomes the guest's own tmpfs.
mkdir -p /mnt/policyd
mount --bind "$POLICYD_REPO" /mnt/policyd
# Likewise the kernel's modules (init linked them from the checkout's build/).
if [ -n "$POLICYD_MODULES" ]; then
    rm -f "/usr/lib/modules/$(uname -r)"
    mkdir -p "/usr/lib/modules/$(uname -r)"
    mount --bind "$POLICYD_MODULES" "/usr/lib/modules/$(uname -r)"
fi
mount -t tmpfs tmpfs /tmp
mkdir -p /run/netns
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
ip link set lo up
echo "POLICYD-LANE-KERNEL $(uname -r)"
cd /mnt/policyd || { echo "POLICYD-LANE-RESULT rc=99"; echo o > /proc/sysrq-trigger; }
# POLICYD_TESTS: pytest arguments, ',' for spaces (kernel arguments cannot hold spaces).
IFS=, read -r -a tests <<< "$POLICYD_TESTS"
# The system python3 has no venv here: policyd comes from the checkout's root,
# the test lab (package policyd_lab) from tests/lab, as `make setup` installs them.
PYTHONPATH=.:tests/lab POLICYD_TEST_TIME_SCALE=$POLICYD_TEST_TIME_SCALE \
    python3 -m pytest -q -rs -p no:cacheprovider --color=no "${tests[@]}"
echo "POLICYD-LANE-RESULT rc=$?"
sync
echo o > /proc/sysrq-trigger
sleep 30
