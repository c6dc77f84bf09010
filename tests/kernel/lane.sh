#!/usr/bin/env bash
# `make test-kernel`: boot Debian bookworm's own kernel (6.1) in qemu and run the
# kernel-contract suite inside it. The guest reuses this machine's root file
# system read-only over 9p under a tmpfs overlay, so it runs the same nft,
# python3-nftables and pytest as the host; only the kernel differs.
#
# Cached under build/kernel/: the kernel package, its unpacked tree and the
# initramfs; a re-run only boots. Fails when the suite fails or the guest never
# reports a result. Env: KERNEL_PACKAGE (default: what linux-image-amd64 depends
# on), LANE_ACCEL (kvm|tcg, default kvm only where the CPU has VMX/SVM),
# LANE_TESTS (pytest arguments, default the contract suite, the ban-agreement
# test and the daemon putting a flushed ruleset back, which drive the daemon and
# CLI on the same sets, and a client's packets counted while policies are
# swapped and while list changes go in as changed elements), LANE_TIMEOUT (seconds).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
BUILD=$REPO/build/kernel
HERE=$REPO/tests/kernel
mkdir -p "$BUILD"

for tool in qemu-system-x86_64 busybox modprobe depmod dpkg-deb apt-get; do
    command -v "$tool" >/dev/null || { echo "test-kernel: $tool missing (make setup installs it)" >&2; exit 2; }
done

PACKAGE=${KERNEL_PACKAGE:-$(apt-cache depends linux-image-amd64 2>/dev/null \
    | sed -n 's/^ *Depends: \(linux-image-6\.1\.[0-9.]*-[0-9]*-amd64\)$/\1/p' | head -n1)}
[ -n "$PACKAGE" ] || { echo "test-kernel: no linux-image-6.1 package found (bookworm apt sources?)" >&2; exit 2; }

TREE=$BUILD/$PACKAGE
if [ ! -e "$TREE/.complete" ]; then
    echo "test-kernel: fetching $PACKAGE"
    rm -rf "$TREE" "$BUILD"/dl && mkdir -p "$BUILD/dl"
    # _apt cannot write into a root-owned build dir: apt warns and downloads as root.
    (cd "$BUILD/dl" && apt-get download -q "$PACKAGE" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
    deb=$(ls "$BUILD"/dl/"$PACKAGE"_*.deb)
    dpkg-deb -x "$deb" "$TREE"
    rm -rf "$BUILD/dl"
    touch "$TREE/.complete"
fi
KV=$(ls "$TREE/lib/modules")
MODULES=$TREE/lib/modules/$KV
[ -e "$MODULES/modules.dep" ] || depmod -b "$TREE" "$KV"

INITRD=$BUILD/initramfs-$KV.cpio.gz
if [ ! -e "$INITRD" ] || [ "$HERE/init" -nt "$INITRD" ]; then
    staging=$(mktemp -d)
    trap 'rm -rf "$staging"' EXIT
    mkdir -p "$staging"/{bin,dev,proc,sys,lower,upper,newroot,modules}
    cp "$(command -v busybox)" "$staging/bin/busybox"
    cp "$HERE/init" "$staging/init"
    chmod 755 "$staging/init"
    # Dependency order from the kernel's own modules.dep; insmod loads them in turn.
    : > "$staging/modules/order"
    for module in virtio_pci 9pnet_virtio 9p overlay; do
        modprobe -d "$TREE" -S "$KV" --show-depends "$module" | awk '$1 == "insmod" {print $2}'
    done | awk '!seen[$0]++' | while read -r path; do
        cp "$path" "$staging/modules/"
        basename "$path" >> "$staging/modules/order"
    done
    (cd "$staging" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > "$INITRD.tmp"
    mv "$INITRD.tmp" "$INITRD"
    rm -rf "$staging"
    trap - EXIT
fi

ACCEL=${LANE_ACCEL:-}
if [ -z "$ACCEL" ]; then
    # A paravirtual /dev/kvm (no VMX/SVM in the CPU flags) cannot boot a stock kernel.
    if [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo; then ACCEL=kvm; else ACCEL=tcg; fi
fi
if [ "$ACCEL" = kvm ]; then
    ACCEL_ARGS=(-accel kvm -cpu host); SCALE=${LANE_TIME_SCALE:-3}
else
    ACCEL_ARGS=(-accel tcg,thread=multi -cpu max); SCALE=${LANE_TIME_SCALE:-25}
fi
TESTS=${LANE_TESTS:-tests/kernel tests/netns/test_bans_agree.py \
tests/netns/test_daemon.py::test_bans_survive_apply_restart_and_a_flushed_ruleset \
tests/netns/test_guard.py::test_reapply_is_atomic_for_a_connecting_client \
tests/netns/test_lists_netns.py::test_a_list_change_drops_no_packet_of_a_client_it_keeps}
LOG=$BUILD/console.log
echo "test-kernel: booting $KV ($ACCEL, waits x$SCALE): pytest $TESTS"
# Kernel arguments with '=' and no '.' reach /init as environment variables.
APPEND="console=ttyS0 quiet loglevel=3 panic=-1 oops=panic \
POLICYD_REPO=$REPO POLICYD_TEST_TIME_SCALE=$SCALE POLICYD_MODULES=$MODULES \
POLICYD_TESTS=${TESTS// /,}"
set +e
timeout "${LANE_TIMEOUT:-1800}" qemu-system-x86_64 "${ACCEL_ARGS[@]}" -m 2048 -smp 2 \
    -display none -serial stdio -monitor none -no-reboot -nic none \
    -kernel "$TREE/boot/vmlinuz-$KV" -initrd "$INITRD" -append "$APPEND" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    < /dev/null 2>&1 | stdbuf -oL tr -d '\r' | tee "$LOG"
qemu_rc=${PIPESTATUS[0]}
set -e
result=$(sed -n 's/^POLICYD-LANE-RESULT rc=\([0-9]*\)$/\1/p' "$LOG" | tail -n1)
if [ -z "$result" ]; then
    echo "test-kernel: FAILED: the guest did not report a result (qemu exit $qemu_rc; console in $LOG)" >&2
    exit 1
fi
guest_kernel=$(sed -n 's/^POLICYD-LANE-KERNEL //p' "$LOG" | tail -n1)
if [ "$result" != 0 ]; then
    echo "test-kernel: FAILED on $guest_kernel: pytest exit $result (console in $LOG)" >&2
    exit 1
fi
echo "test-kernel: passed on $guest_kernel"
