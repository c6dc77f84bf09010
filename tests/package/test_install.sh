#!/usr/bin/env bash
# The operator's install path, end to end: build the .deb, lint it, install it
# with apt, run the installed /usr/bin/policyd against /etc/policyd/policy.yaml
# (apply only inside network namespaces made here), then purge it again.
# Usage (root): tests/package/test_install.sh [DEBDIR]   (default: build/deb)
# The root namespace's ruleset is only read, before and after, to prove that
# installing and purging never touched it.
set -uo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
debdir=${1:-$repo/build/deb}
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export DEBIAN_FRONTEND=noninteractive
unset SSH_CONNECTION  # the anti-lockout lint reads it; no operator session here

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok - $1"; }
not_ok() { failed=$((failed + 1)); echo "not ok - $1"; }
check() {  # check DESCRIPTION COMMAND...: one counted assertion
    local description=$1; shift
    if "$@" >/dev/null; then ok "$description"; else not_ok "$description"; fi
}
finish() {
    echo "package: $passed passed, $failed failed"
    [ "$failed" -eq 0 ]
    exit
}
abort() { not_ok "$1"; finish; }

[ "$(id -u)" = 0 ] || { echo "test_install: must run as root" >&2; exit 2; }

workdir=$(mktemp -d /tmp/policyd-pkgtest.XXXXXX)
chmod 755 "$workdir"  # apt's _apt user reads the .deb from here
tag=pdpkg$$
server=$tag-srv
client=$tag-cli
installed_here=0
policy_rc_d_here=0
listeners=()

cleanup() {
    local pid
    for pid in "${listeners[@]}"; do kill "$pid" 2>/dev/null; done
    ip netns del "$server" 2>/dev/null
    ip netns del "$client" 2>/dev/null
    if [ "$installed_here" = 1 ] && dpkg -s policyd >/dev/null 2>&1; then
        apt-get purge -y -q policyd >/dev/null 2>&1
    fi
    [ "$policy_rc_d_here" = 0 ] || rm -f /usr/sbin/policy-rc.d
    rm -rf "$workdir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

root_ruleset() { nft list ruleset 2>/dev/null | sha256sum; }

# --- the package itself -------------------------------------------------------
shopt -s nullglob
debs=("$debdir"/policyd_*_all.deb)
changes=("$debdir"/policyd_*.changes)
[ "${#debs[@]}" = 1 ] && [ "${#changes[@]}" = 1 ] \
    || abort "exactly one policyd .deb and .changes in $debdir (run make deb)"
ok "found ${debs[0]##*/}"

lintian --pedantic --fail-on warning "${changes[0]}" >"$workdir/lintian.log" 2>&1
lintian_rc=$?
grep -v 'running with root privileges' "$workdir/lintian.log"
check "lintian --pedantic --fail-on warning passes on the .changes" test "$lintian_rc" = 0

# --- install --------------------------------------------------------------------
ruleset_before=$(root_ruleset)
if [ -d /run/systemd/system ] && [ ! -e /usr/sbin/policy-rc.d ]; then
    # A running systemd would start the service on install, in the root
    # namespace; policy-rc.d is Debian's switch that forbids it for this test.
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    policy_rc_d_here=1
elif [ -d /run/systemd/system ]; then
    abort "systemd runs here and /usr/sbin/policy-rc.d exists: refusing to install"
fi
dpkg -s policyd >/dev/null 2>&1 \
    && abort "policyd is already installed here; this test installs and purges it (apt-get purge policyd)"
cp "${debs[0]}" "$workdir/"
installed_here=1
if (cd "$workdir" && apt-get install -y -q ./policyd_*_all.deb >"$workdir/apt.log" 2>&1); then
    ok "apt-get install ./${debs[0]##*/}"
else
    tail -n 30 "$workdir/apt.log"
    abort "apt-get install ./${debs[0]##*/}"
fi

check "/usr/bin/policyd is installed and executable" test -x /usr/bin/policyd
check "/usr/bin/policyd runs the system python3" \
    grep -qx '#! */usr/bin/python3' <(head -n 1 /usr/bin/policyd)
# The bench times commands through a copy of it (tests/lab/installed/policyd).
check "the bench's copy of /usr/bin/policyd runs the same code" \
    diff <(grep -v '^#' /usr/bin/policyd) <(grep -v '^#' "$repo/tests/lab/installed/policyd")
check "/etc/policyd/policy.yaml is a conffile" \
    grep -q ' /etc/policyd/policy.yaml ' <(dpkg-query -W -f='${Conffiles}\n' policyd)
check "filters are installed under /usr/share/policyd/filters" \
    compgen -G '/usr/share/policyd/filters/*.yaml'
check "the man page policyd(8) is installed" man -w policyd
check "the service unit is installed" test -f /lib/systemd/system/policyd.service

verify_out=$(cd "$workdir" && systemd-analyze verify policyd.service 2>&1)
[ -z "$verify_out" ] || echo "$verify_out"
check "systemd-analyze verify policyd.service prints nothing" test -z "$verify_out"

exposure=$(systemd-analyze security --offline=yes /lib/systemd/system/policyd.service 2>/dev/null \
           | sed -n 's/.*Overall exposure level for policyd.service: \([0-9.]*\).*/\1/p')
check "systemd-analyze security scores the unit ${exposure:-?} <= 2.0" \
    awk -v score="$exposure" 'BEGIN { exit !(score != "" && score <= 2.0) }'
check "installing left the root namespace's ruleset as it was" \
    test "$(root_ruleset)" = "$ruleset_before"

# --- the installed CLI on the shipped policy ----------------------------------------
check_out=$(cd "$workdir" && /usr/bin/policyd check /etc/policyd/policy.yaml 2>&1)
check_rc=$?
[ -z "$check_out" ] || echo "$check_out"
check "policyd check /etc/policyd/policy.yaml: exit 0, prints nothing" \
    test "$check_rc" = 0 -a -z "$check_out"
show_out=$(cd "$workdir" && /usr/bin/policyd show /etc/policyd/policy.yaml 2>&1)
check "policyd show /etc/policyd/policy.yaml prints the table guarding 11434" \
    grep -q 'tcp dport 11434' <<<"$show_out"

check "the autopkgtest debian/tests/installed-policy passes" \
    env AUTOPKGTEST_TMP="$workdir" "$repo/debian/tests/installed-policy"

# --- apply in a namespace; a second one, joined by veth, is the outside world ------
ip netns add "$server" && ip netns add "$client" \
    && ip link add "$tag-s" netns "$server" type veth peer name "$tag-c" netns "$client" \
    && ip -n "$server" link set lo up && ip -n "$client" link set lo up \
    && ip -n "$server" address add 192.0.2.1/24 dev "$tag-s" \
    && ip -n "$client" address add 192.0.2.2/24 dev "$tag-c" \
    && ip -n "$server" link set "$tag-s" up && ip -n "$client" link set "$tag-c" up \
    || abort "set up the namespaces $server and $client"

for port in 11434 8080; do  # 8080 is not in the policy: it must stay open
    ip netns exec "$server" python3 -m http.server "$port" --bind 0.0.0.0 \
        --directory "$workdir" >/dev/null 2>&1 &
    listeners+=($!)
done

# reach NAMESPACE ADDRESS PORT: exit 0 if a TCP connection is accepted.
reach() {
    ip netns exec "$1" python3 -c '
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
except OSError:
    sys.exit(1)' "$2" "$3"
}
refused() { ! reach "$@"; }
for _ in $(seq 50); do
    reach "$server" 127.0.0.1 11434 && reach "$server" 127.0.0.1 8080 && break
    sleep 0.1
done
reach "$client" 192.0.2.1 11434 \
    || abort "before apply, the client reaches 192.0.2.1:11434 (else the test proves nothing)"

# --- the first start never silently cuts a client that is using Ollama now ----------
# What the service does on install, in the namespace: nothing committed, a LAN
# client connected to 11434, the shipped loopback-only policy. The daemon must
# not enforce it, and status and doctor must say so.
ip netns exec "$client" python3 -c '
import socket, sys, time
s = socket.create_connection(("192.0.2.1", 11434), timeout=2)
print("connected", flush=True)
time.sleep(60)' >"$workdir/held-client.out" 2>&1 &
held_client=$!
listeners+=($held_client)
for _ in $(seq 50); do grep -q connected "$workdir/held-client.out" && break; sleep 0.1; done
first_env=(env POLICYD_STATE_DIR="$workdir/first-state" POLICYD_RUN_DIR="$workdir/first-run")
ip netns exec "$server" "${first_env[@]}" /usr/bin/policyd run >"$workdir/first-run.log" 2>&1 &
first_daemon=$!
listeners+=($first_daemon)
held=0
for _ in $(seq 100); do
    if ip netns exec "$server" "${first_env[@]}" /usr/bin/policyd status 2>/dev/null \
            | grep -q "NOT ENFORCED"; then held=1; break; fi
    sleep 0.1
done
check "the first start with a connected LAN client holds the policy back (status says NOT ENFORCED)" \
    test "$held" = 1
check "the connected LAN client still reaches 11434" reach "$client" 192.0.2.1 11434
check "the first start loaded no table" \
    bash -c "! ip netns exec $server nft list table inet policyd 2>/dev/null"
doctor_out=$(ip netns exec "$server" "${first_env[@]}" /usr/bin/policyd doctor 2>&1)
doctor_rc=$?
check "doctor exits 1 and says NOT ENFORCED" \
    bash -c "test $doctor_rc = 1 && grep -q 'NOT ENFORCED' <<<\"\$1\"" _ "$doctor_out"
check "the daemon's log says NOT ENFORCING and names the client" \
    grep -q "NOT ENFORCING.*192.0.2.2" "$workdir/first-run.log"
kill "$first_daemon" "$held_client" 2>/dev/null; wait "$first_daemon" "$held_client" 2>/dev/null
sleep 0.5  # the server's side of the held connection closes too; the apply below lints

check "README and the filter format are installed as documentation" \
    bash -c 'compgen -G "/usr/share/doc/policyd/README.md*" && compgen -G "/usr/share/doc/policyd/filters.md*"'

check "policyd apply /etc/policyd/policy.yaml inside $server" \
    ip netns exec "$server" env POLICYD_STATE_DIR="$workdir/state" POLICYD_RUN_DIR="$workdir/run" \
        /usr/bin/policyd apply /etc/policyd/policy.yaml
check "table inet policyd is loaded in $server" \
    ip netns exec "$server" nft list table inet policyd
check "127.0.0.1 reaches 11434 after apply" reach "$server" 127.0.0.1 11434
check "192.0.2.2 (outside the allowlist) no longer reaches 11434" \
    refused "$client" 192.0.2.1 11434
check "192.0.2.2 still reaches the unguarded port 8080" reach "$client" 192.0.2.1 8080
check "applying in a namespace left the root namespace's ruleset as it was" \
    test "$(root_ruleset)" = "$ruleset_before"

# --- purge ----------------------------------------------------------------------------
if apt-get purge -y -q policyd >"$workdir/apt.log" 2>&1; then
    ok "apt-get purge policyd"
else
    tail -n 30 "$workdir/apt.log"
    not_ok "apt-get purge policyd"
fi
check "/usr/bin/policyd is gone after purge" test ! -e /usr/bin/policyd
check "/etc/policyd is gone after purge" test ! -e /etc/policyd
check "dpkg no longer knows policyd" bash -c '! dpkg -s policyd >/dev/null 2>&1'
check "purging left the root namespace's ruleset as it was" \
    test "$(root_ruleset)" = "$ruleset_before"
finish
