"""Doctor's checks of the host around policyd: listeners on the guarded ports,
interfaces, logs and filters, nftables.service, the daemon and the fleet's Redis.
Every fact comes from an environment object (policyd.operator.hostenv.HostEnvironment).
"""
import ipaddress

from policyd.operator import unitaccess
from policyd.operator.doctor_report import Finding, fail, ok, warn
from policyd.errors import InputError
from policyd.rules.model import FAMILY

# The packaged unit hides these from the daemon (ProtectHome=yes, PrivateTmp=yes).
HIDDEN_FROM_DAEMON = ("/home/", "/root/", "/run/user/", "/tmp/", "/var/tmp/")


# --- listeners -----------------------------------------------------------

def check_listeners(policy, env, table, guard_loaded):
    """Who listens on each guarded port, and whether that is the whole world."""
    findings = []
    # A port the policy opens to `any` is meant for the world (a proxy in front
    # of Ollama): a wildcard listener there is the set-up, not a finding.
    public = {(s.proto, port): s.name for s in policy.services if s.allow_any
              for port in s.ports}
    for proto in ("tcp", "udp"):
        ports = sorted({port for p, port in policy.guarded() if p == proto})
        if not ports:
            continue
        try:
            found = env.listeners(ports, proto)
        except OSError as exc:
            return findings + [warn("listener", f"cannot list listening sockets ({exc})",
                                    "run `policyd doctor` as root so sock_diag answers")]
        owners = env.socket_owners({l.inode for l in found}) if found else {}
        for port in ports:
            here = sorted({(str(l.address), l.inode) for l in found if l.port == port})
            if not here:
                findings.append(ok("listener", f"{proto}/{port}: nothing listens"))
                continue
            for address, inode in here:
                if (proto, port) in public:
                    findings.append(_public_listener_finding(
                        port, ipaddress.ip_address(address), owners.get(inode, ()), proto,
                        public[(proto, port)]))
                    continue
                findings.append(_listener_finding(port, ipaddress.ip_address(address),
                                                  owners.get(inode, ()), table, guard_loaded,
                                                  proto))
    return findings


def _listener_finding(port, address, owners, table, guard_loaded, proto="tcp"):
    who = ", ".join(f"{name} (pid {pid})" for pid, name in owners) or "a socket"
    shown = f"[{address}]" if address.version == 6 else str(address)
    if address.is_loopback:
        return ok("listener", f"{proto}/{port}: {who} listens on {shown}:{port} (this host only)")
    if not address.is_unspecified:
        return ok("listener", f"{proto}/{port}: {who} listens on {shown}:{port} only")
    if guard_loaded:
        # Sharing a port with a LAN needs a wildcard listener (loopback clients
        # too); with the table loaded that is the set-up, and table/drift say
        # when it is not. The advice stays in the message.
        return ok("listener", f"{proto}/{port}: {who} listens on {shown}:{port}; policyd's "
                  f"table {FAMILY} {table} (loaded) admits only the allow list (bind it to "
                  "127.0.0.1 if only this host needs it)")
    if guard_loaded is None:
        guard = "whether policyd's table is loaded could not be read"
    else:
        guard = (f"policyd's table {FAMILY} {table} is NOT loaded: nothing stands "
                 "between it and the network")
    scope = ("every IPv4 address" if address.version == 4
             else "every IPv6 address, and IPv4 too unless it is IPV6_V6ONLY")
    return warn("listener", f"{proto}/{port}: {who} listens on {shown}:{port}, {scope}; {guard}",
                _listener_fix(port, {name for _pid, name in owners}))


def _public_listener_finding(port, address, owners, proto, service):
    who = ", ".join(f"{name} (pid {pid})" for pid, name in owners) or "a socket"
    shown = f"[{address}]" if address.version == 6 else str(address)
    return ok("listener", f"{proto}/{port}: {who} listens on {shown}:{port}; service {service} "
              "allows any source there (bans still apply)")


def _listener_fix(port, names):
    if "docker-proxy" in names:
        return (f"publish the port on loopback only (`-p 127.0.0.1:{port}:{port}`, or "
                f"\"127.0.0.1:{port}:{port}\" under ports: in compose) if only this host's "
                "proxy needs it; otherwise keep policyd's table loaded")
    if "ollama" in names:
        return (f"`systemctl edit ollama` and set Environment=OLLAMA_HOST=127.0.0.1:{port} "
                "if only this host's proxy talks to it; otherwise keep policyd's table loaded")
    return (f"bind it to 127.0.0.1:{port} (or the one address its clients use) if other "
            "hosts need not reach it; otherwise keep policyd's table loaded")


# --- interfaces ----------------------------------------------------------

def check_interfaces(policy, env):
    """Every `iface:` allow names an interface that exists (a `wg*` pattern: any match)."""
    named = sorted({(iface, s.name) for s in policy.services for iface in s.allow_interfaces})
    if not named:
        return []
    try:
        present = set(env.interfaces())
    except OSError as exc:
        return [warn("interface", f"cannot list network interfaces ({exc})",
                     "run `policyd doctor` on the host itself, as root")]
    findings = []
    for iface, service in named:
        if iface.endswith("*"):
            exists = any(name.startswith(iface[:-1]) for name in present)
        else:
            exists = iface in present
        if exists:
            findings.append(ok("interface", f"{iface} (service {service}) exists"))
        else:
            findings.append(warn(
                "interface", f"{iface} (service {service}) does not exist: its allow "
                "matches nothing until it does",
                f"fix the name in services.{service}.allow (present: "
                f"{', '.join(sorted(present)) or 'none'}) or bring the interface up"))
    return findings


# --- logs and filters ----------------------------------------------------

def check_logs(policy, env):
    """Each log in bans.logs exists, root can read it, and the daemon's unit can see it."""
    findings = []
    for index, source in enumerate(policy.bans.logs):
        if source.journal:
            findings.append(check_journal(source, index, env))
            continue
        key = f"bans.logs[{index}].path"
        try:
            env.open_log(source.path)
        except FileNotFoundError:
            findings.append(warn(
                "log", f"{source.path} does not exist: the daemon waits for it and bans "
                "nothing from it until it appears",
                f"point {key} at the file the proxy writes (its access_log / log "
                "setting), or make the proxy log there"))
            continue
        except OSError as exc:
            findings.append(fail(
                "log", f"{source.path} cannot be read ({exc.strerror or exc})",
                f"make it a readable regular file (ls -l {source.path}) or fix {key}"))
            continue
        if source.path.startswith(HIDDEN_FROM_DAEMON):
            findings.append(warn(
                "log", f"{source.path} is readable here, but the packaged unit hides it "
                "from the daemon (ProtectHome=yes, PrivateTmp=yes)",
                "have the proxy log under /var/log, or add ReadOnlyPaths= for it with "
                "`systemctl edit policyd`"))
            continue
        findings.append(ok("log", f"file {source.path} is readable (filter {source.filter})"))
    return findings


def check_journal(source, index, env):
    """A `journal: UNIT` source: the journal can be read and holds entries of that unit."""
    from policyd.logs.journal import probe
    where = f" in {source.journal_dir}" if source.journal_dir else ""
    state = getattr(env, "journal_probe", probe)(source.journal, source.journal_dir)
    name = f"journal {source.journal}{where}"
    if not state["readable"]:
        return fail("log", f"{name} cannot be read ({state['error']})",
                    "run as root; for a journal outside /var/log/journal and /run/log/journal "
                    f"set bans.logs[{index}].journal_dir")
    if not state["entries"]:
        return warn("log", f"{name} is readable but holds no entry of that unit yet",
                    f"check the unit name with `journalctl -u {source.journal}` (Debian's "
                    "OpenSSH unit is ssh.service; policyd matches _SYSTEMD_UNIT, not aliases; "
                    "a template NAME@.service matches instances in system-NAME.slice)")
    age = max(0, round(env.now() - state["last"]))
    return ok("log", f"{name} is readable, last entry {age}s ago (filter {source.filter})")


def check_filters(policy, env):
    """Each filter named in bans.logs loads; a daemon with a broken filter will not start."""
    findings = []
    for name in sorted({source.filter for source in policy.bans.logs}):
        try:
            env.load_filter(name)
        except InputError as exc:
            findings.append(fail(
                "filter", f"filter {name!r} does not load: {exc}",
                "name a shipped filter (see /usr/share/policyd/filters) in "
                "bans.logs[].filter, or fix the filter file"))
        else:
            findings.append(ok("filter", f"filter {name!r} loads"))
    return findings


def check_daemon_logs(env):
    """Logs the running daemon reports it cannot follow (a filter that stopped loading,
    a path that cannot be read), from its own status; nothing when no daemon answers."""
    status = env.daemon_status()
    if not status:
        return []
    return [fail("log", f"the daemon does not follow {entry.get('path')}: {entry['error']}",
                 "fix the filter or the path, then `policyd apply` (or `systemctl reload "
                 "policyd` if the policy itself did not change)")
            for entry in status.get("logs", []) if entry.get("error")]


# --- the host's services ------------------------------------------------

def check_nftables_service(env):
    links = env.nftables_service_links()
    if not links:
        return [ok("nftables-service", "nftables.service is not enabled")]
    return [warn(
        "nftables-service", f"Debian's nftables.service is enabled ({links[0]}): stopping "
        "it flushes the whole ruleset, and the stock /etc/nftables.conf's `flush ruleset` "
        "does the same on every start and reload; the daemon puts its tables and bans "
        "back, but there is a short gap without them",
        "keep policyd's unit After=nftables.service (the packaged one is) and, in "
        "/etc/nftables.conf, replace `flush ruleset` by deleting only your own tables "
        "(`table inet filter` then `delete table inet filter`); or, if that file holds "
        "nothing you need, `systemctl disable nftables` (without --now: a stop flushes)")]


def check_daemon(env):
    path = env.control_socket_path()
    state = env.control_socket_state()
    if state == "listening":
        return [ok("daemon", f"the daemon answers on {path}")]
    if state == "denied":
        return [warn("daemon", f"cannot tell whether the daemon runs: {path} is root's",
                     "run `policyd doctor` as root")]
    if state == "stale":
        return [warn("daemon", f"{path} exists but nothing listens on it: the daemon died",
                     "`systemctl restart policyd`; `journalctl -u policyd` says why it stopped")]
    return [warn("daemon", f"the daemon is not running (no {path}): nothing bans, and "
                 "nothing restores the tables after a flush",
                 "`systemctl enable --now policyd`")]


def check_fleet(policy):
    """Redis reachable with this node's credentials, and its ACL as the README sets it."""
    if policy.fleet is None:
        return []
    from policyd.fleet.transport import doctor_findings
    return [Finding(level, "fleet", message, fix)
            for level, message, fix in doctor_findings(policy.fleet)]


def check_fleet_sandbox(policy, env):
    """The installed unit's IPAddressDeny=any would keep the daemon from Redis (doctor
    itself runs outside the sandbox, so Redis answering it proves nothing)."""
    access = env.unit_ip_access() if policy.fleet is not None else None
    if access is None:
        return []    # no fleet, or no policyd unit installed (a run from a checkout)
    files, lists = access
    addresses = env.resolve(policy.fleet.host)
    blocked = [a for a in addresses if unitaccess.blocked(a, lists)]
    where = ", ".join(str(path) for path in files)
    if not blocked:
        return [ok("fleet", f"the policyd unit ({where}) may reach Redis at "
                   + " ".join(str(a) for a in addresses))] if addresses else []
    shown = " ".join(str(a) for a in blocked)
    return [Finding("fail", "fleet", f"the policyd unit may not reach Redis at {shown}: "
                    f"IPAddressDeny= in {where} blocks it, so the daemon cannot join the fleet",
                    f"`systemctl edit policyd` and add: [Service] IPAddressAllow={shown}, "
                    "then `systemctl restart policyd`")]
