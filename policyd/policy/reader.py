"""The policy file: YAML version 1 read and validated into the policy model.

Owns validation. Every error names file, line and key in one line, so a bad
policy is refused before anything reaches the kernel. The model itself (the
frozen dataclasses) is in policyd.policy.model; its names are here too.
"""
import hashlib
import re
from pathlib import Path

import yaml

from policyd.policy import listparse, lists
from policyd.addr import parse_network
from policyd.errors import InputError
from policyd.fleet.config import read_fleet
from policyd.policy.model import BanSettings, LogSource, Policy, Rate, Service

DEFAULT_POLICY = "/etc/policyd/policy.yaml"

# nftables object names are built from these; the patterns keep nft syntax out.
TABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}\Z")
SERVICE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")
# Linux IFNAMSIZ is 16 including the NUL; a trailing * is an nftables wildcard.
INTERFACE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,15}\*?\Z")
DURATION = re.compile(r"(\d+)([smhdw]?)\Z")
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
JOURNAL_UNIT = re.compile(
    r"[A-Za-z0-9:_.\\@-]{1,250}\.(service|socket|scope|timer|mount|target|path|slice)\Z")
RATE = re.compile(r"(\d+)/(second|minute|hour|day)\Z")


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """libyaml's parser (line marks kept, ~10x faster) with a cheap path for addresses.

    Resolving a scalar's implicit tag runs Python regexes per value; an
    allowlist of 100k networks is mostly strings that are plainly not numbers.
    """

    def resolve(self, kind, value, implicit):
        if kind is yaml.ScalarNode and implicit[0] and ("/" in value or ":" in value[1:-1]):
            return "tag:yaml.org,2002:str"
        return super().resolve(kind, value, implicit)


def parse_duration(value, file=None, line=None, key=None):
    """`30s`, `10m`, `1h`, `2d`, `1w` or a bare integer of seconds -> seconds."""
    if isinstance(value, bool):
        raise InputError(f"{value!r} is not a duration", file, line, key)
    if isinstance(value, int):
        seconds = value
    else:
        match = DURATION.match(str(value).strip())
        if not match:
            raise InputError(
                f"{value!r} is not a duration (use 30s, 10m, 1h, 2d, 1w or seconds)",
                file, line, key)
        seconds = int(match.group(1)) * DURATION_UNITS[match.group(2)]
    if seconds <= 0:
        raise InputError("a duration must be positive", file, line, key)
    return seconds


def load(path):
    """Read and validate the policy at `path`; raise InputError on any problem."""
    return read(path)[1]


def read(path):
    """(the file's exact bytes, the validated Policy) for the policy at `path`."""
    path = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(exc.strerror or str(exc), path) from None
    return data, loads(data, path)


def loads(data, source="<policy>"):
    if isinstance(data, str):
        data = data.encode()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 (byte {exc.start})", source) from None
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise InputError(f"malformed YAML: {problem}", source, line) from None
    reader = _Reader(source)
    policy = reader.policy(root)
    return Policy(policy.table, policy.services, policy.bans, source,
                  hashlib.sha256(data).hexdigest(), fleet=policy.fleet)


class _Reader:
    """Walks the composed YAML node tree, so every error knows its line."""

    def __init__(self, source, list_reader=lists.read):
        self.source = source
        self.list_reader = list_reader
        self.constructor = yaml.constructor.SafeConstructor()
        self._port_nodes = {}  # service name -> {port: the YAML node listing it}

    def fail(self, node, key, message):
        raise InputError(message, self.source, node.start_mark.line + 1 if node else None, key)

    def mapping(self, node, key, allowed, required=()):
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, key, "must be a mapping")
        items = {}
        for knode, vnode in node.value:
            name = self.scalar_text(knode, key)
            child = f"{key}.{name}" if key else name
            if name in items:
                self.fail(knode, child, "appears twice")
            if allowed is not None and name not in allowed:
                self.fail(knode, child, f"unknown key (allowed: {', '.join(sorted(allowed))})")
            items[name] = (knode, vnode)
        for name in required:
            if name not in items:
                self.fail(node, f"{key}.{name}" if key else name, "is required")
        return items

    def scalar_text(self, node, key):
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, key, "must be a single value")
        return node.value

    def absolute_paths(self, entry, names, key):
        """{name: path} of the `names` present in a mapping's `entry`, each refused
        unless absolute (a relative path means whatever the daemon's cwd is)."""
        paths = {}
        for name in names:
            if name in entry:
                path = self.scalar_text(entry[name][1], f"{key}.{name}")
                if not path.startswith("/"):
                    self.fail(entry[name][1], f"{key}.{name}", f"{path!r} must be absolute")
                paths[name] = path
        return paths

    def scalar(self, node, key):
        """The scalar's value with YAML's own typing (int, bool, str)."""
        if not isinstance(node, yaml.ScalarNode):
            self.fail(node, key, "must be a single value")
        return self.constructor.construct_object(node)

    def sequence(self, node, key):
        if isinstance(node, yaml.ScalarNode):
            return [node]  # `allow: any` reads as well as `allow: [any]`
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, key, "must be a list")
        return node.value

    def integer(self, node, key, low, high):
        value = self.scalar(node, key)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(node, key, f"{node.value!r} is not an integer")
        if not low <= value <= high:
            self.fail(node, key, f"{value} is out of range {low}..{high}")
        return value

    def choice(self, node, key, options):
        value = self.scalar(node, key)
        if value not in options:
            self.fail(node, key, f"{node.value!r} is not one of: {', '.join(options)}")
        return value

    def duration(self, node, key):
        return parse_duration(self.scalar(node, key), self.source, node.start_mark.line + 1, key)

    def ports(self, node, key, item_nodes=None):
        ports = []
        for item in self.sequence(node, key):
            port = self.integer(item, key, 1, 65535)
            if port in ports:
                self.fail(item, key, f"port {port} is listed twice")
            ports.append(port)
            if item_nodes is not None:
                item_nodes[port] = item
        if not ports:
            self.fail(node, key, "needs at least one port")
        return tuple(ports)

    def network(self, node, key):
        text = self.scalar_text(node, key)
        try:
            return parse_network(text)
        except ValueError as exc:
            self.fail(node, key, f"{text!r} is not a valid address or network ({exc})")

    def policy(self, root):
        if root is None:
            raise InputError("empty policy", self.source)
        top = self.mapping(root, "", {"version", "table", "services", "bans", "fleet"},
                           required=("version", "services"))
        knode, vnode = top["version"]
        if self.scalar(vnode, "version") != 1:
            self.fail(vnode, "version", f"unsupported version {vnode.value!r} (expected 1)")
        table = "policyd"
        if "table" in top:
            vnode = top["table"][1]
            table = self.scalar_text(vnode, "table")
            if not TABLE_NAME.match(table):
                self.fail(vnode, "table", f"{table!r} is not a valid table name "
                          "(letter, then letters, digits, _; at most 32)")
        snode = top["services"][1]
        services = tuple(self.service(name, knode, vnode)
                         for name, (knode, vnode) in
                         self.mapping(snode, "services", None).items())
        if not services:
            self.fail(snode, "services", "needs at least one service")
        seen = {}
        for service in services:
            for port in service.ports:
                other = seen.setdefault((service.proto, port), service.name)
                if other != service.name:
                    # The later listing is the one to blame: its own line.
                    self.fail(self._port_nodes[service.name][port],
                              f"services.{service.name}.ports",
                              f"{service.proto} port {port} is also in service {other!r}")
        bans = self.bans(top.get("bans", (None, None))[1], services)
        fleet = read_fleet(self, top["fleet"][1], bans) if "fleet" in top else None
        return Policy(table, services, bans, self.source, fleet=fleet)

    def service(self, name, knode, node):
        key = f"services.{name}"
        if not SERVICE_NAME.match(name):
            self.fail(knode, key, "service names are lower-case letters, digits and _ (at most 32)")
        items = self.mapping(node, key, {"ports", "proto", "allow", "deny", "action", "rate"},
                             required=("ports", "allow"))
        ports = self.ports(items["ports"][1], f"{key}.ports",
                           self._port_nodes.setdefault(name, {}))
        proto = "tcp"
        if "proto" in items:
            proto = self.choice(items["proto"][1], f"{key}.proto", ("tcp", "udp"))
        action = "drop"
        if "action" in items:
            action = self.choice(items["action"][1], f"{key}.action", ("drop", "reject"))
        rate = None
        if "rate" in items:
            rate = self.rate(items["rate"][1], f"{key}.rate")
        allow_any, interfaces, allow_lists = False, [], []
        akey = f"{key}.allow"
        allow = self.sequence(items["allow"][1], akey)
        # 100k plain network texts in one bulk pass; anything else one by one.
        nets = (all(type(item) is yaml.ScalarNode for item in allow)
                and listparse.texts([item.value for item in allow])) or {}
        for item in () if nets else allow:
            if isinstance(item, yaml.MappingNode) and self._is_file(item):
                allow_lists.append(self.list_file(item, akey, allow_lists))
            elif isinstance(item, yaml.MappingNode):
                entry = self.mapping(item, akey, {"iface", "file"}, required=("iface",))
                iface = self.scalar_text(entry["iface"][1], f"{akey}.iface")
                if not INTERFACE_NAME.match(iface):
                    self.fail(item, f"{akey}.iface", f"{iface!r} is not a valid interface name")
                if iface in interfaces:
                    self.fail(item, f"{akey}.iface", f"{iface!r} is listed twice")
                interfaces.append(iface)
            elif self.scalar_text(item, akey) == "any":
                allow_any = True
            else:
                self.add_network(nets, item, akey)
        deny, deny_lists = {}, []
        if "deny" in items:
            dkey = f"{key}.deny"
            for item in self.sequence(items["deny"][1], dkey):
                if isinstance(item, yaml.MappingNode):
                    self.mapping(item, dkey, {"file"}, required=("file",))
                    deny_lists.append(self.list_file(item, dkey, deny_lists))
                    continue
                if self.scalar_text(item, dkey) == "any":
                    self.fail(item, dkey, "`any` would drop every source; list networks")
                self.add_network(deny, item, dkey)
        return Service(
            name=name, ports=ports, proto=proto, allow_any=allow_any,
            allow4=lists.Networks(4, [(f, p) for v, f, p in nets if v == 4]),
            allow6=lists.Networks(6, [(f, p) for v, f, p in nets if v == 6]),
            allow_interfaces=tuple(interfaces), action=action, rate=rate,
            allow_lists=tuple(allow_lists),
            deny4=lists.Networks(4, [(f, p) for v, f, p in deny if v == 4]),
            deny6=lists.Networks(6, [(f, p) for v, f, p in deny if v == 6]),
            deny_lists=tuple(deny_lists))

    def add_network(self, seen, node, key):
        """One inline network into `seen` (a dict of (version, first, prefix length),
        ordered, O(1) duplicate checks). Parsed to integers: an allowlist of 100k
        ipaddress objects costs seconds; errors say what parse_network says."""
        entry = lists.parse_text(self.scalar_text(node, key))
        if entry is None:
            network = self.network(node, key)  # raises with the exact reason, or:
            entry = (network.version, int(network.network_address), network.prefixlen)
        if entry in seen:
            self.fail(node, key, f"{lists.cidr_text(*entry)} is listed twice")
        seen[entry] = None

    @staticmethod
    def _is_file(node):
        return any(isinstance(k, yaml.ScalarNode) and k.value == "file" for k, _ in node.value)

    def list_file(self, node, key, seen):
        """`- file: /abs/path`: the list file read and validated (errors name its line)."""
        entry = self.mapping(node, key, {"file"}, required=("file",))
        vnode = entry["file"][1]
        path = self.scalar_text(vnode, f"{key}.file")
        if not path.startswith("/"):
            self.fail(vnode, f"{key}.file", f"{path!r} must be absolute")
        if any(netlist.path == path for netlist in seen):
            self.fail(vnode, f"{key}.file", f"{path!r} is listed twice")
        try:
            return self.list_reader(path)
        except InputError as exc:
            if exc.line is None:  # unreadable: say where the policy names it
                self.fail(vnode, f"{key}.file", f"{path}: {exc.message}")
            raise

    def rate(self, node, key):
        text = str(self.scalar(node, key))
        match = RATE.match(text.replace(" ", ""))
        if not match or int(match.group(1)) < 1:
            self.fail(node, key, f"{text!r} is not a rate (like 20/second or 100/minute)")
        return Rate(int(match.group(1)), match.group(2))

    def bans(self, node, services):
        all_ports = tuple(sorted({p for s in services for p in s.ports}))
        if node is None:
            return BanSettings(ports=all_ports)
        items = self.mapping(node, "bans", {"ports", "maxretry", "findtime", "bantime",
                                            "bantime_max", "ipv6_prefix", "ignore", "logs"})
        values = {"ports": all_ports}
        if "ports" in items:
            values["ports"] = self.ports(items["ports"][1], "bans.ports")
        if "maxretry" in items:
            values["maxretry"] = self.integer(items["maxretry"][1], "bans.maxretry", 1, 1000)
        for name in ("findtime", "bantime", "bantime_max"):
            if name in items:
                values[name] = self.duration(items[name][1], f"bans.{name}")
        if "ipv6_prefix" in items:
            values["ipv6_prefix"] = self.integer(items["ipv6_prefix"][1], "bans.ipv6_prefix",
                                                 16, 128)
        if "ignore" in items:
            values["ignore"] = tuple(self.network(n, "bans.ignore")
                                     for n in self.sequence(items["ignore"][1], "bans.ignore"))
        if "logs" in items:
            logs = []
            for item in self.sequence(items["logs"][1], "bans.logs"):
                logs.append(self.log_source(item))
            values["logs"] = tuple(logs)
        settings = BanSettings(**values)
        seen = set()
        for source in settings.logs:
            if source.label in seen:
                self.fail(items["logs"][1], "bans.logs", f"{source.label} is listed twice")
            seen.add(source.label)
        if settings.bantime_max < settings.bantime:
            self.fail(items["bantime_max"][1], "bans.bantime_max", "is shorter than bans.bantime")
        return settings

    def log_source(self, item):
        """One bans.logs entry: `path:` a file or `journal:` a unit, `filter:`, and
        for fail2ban filters `mode:`; `journal_dir:` points at another journal."""
        key = "bans.logs"
        entry = self.mapping(item, key, {"path", "journal", "journal_dir", "filter", "mode"},
                             required=("filter",))
        if ("path" in entry) == ("journal" in entry):
            self.fail(item, key, "needs exactly one of `path` (a log file) or `journal` (a unit)")
        values = self.absolute_paths(entry, ("path", "journal_dir"), key)
        if "journal" in entry:
            unit = self.scalar_text(entry["journal"][1], f"{key}.journal")
            if not JOURNAL_UNIT.match(unit):
                self.fail(entry["journal"][1], f"{key}.journal",
                          f"{unit!r} is not a systemd unit name (like caddy.service or ssh.service)")
            if "@." in unit and not unit.endswith("@.service"):
                self.fail(entry["journal"][1], f"{key}.journal",
                          f"{unit!r}: only service templates (NAME@.service) have instances "
                          "that log")
            values["journal"] = unit
        elif "journal_dir" in entry:
            self.fail(entry["journal_dir"][0], f"{key}.journal_dir", "only with `journal`")
        name = self.scalar_text(entry["filter"][1], f"{key}.filter")
        fail2ban = name.startswith("fail2ban:") or name.endswith(".conf")
        if "mode" in entry:
            if not fail2ban:
                self.fail(entry["mode"][0], f"{key}.mode",
                          "only fail2ban filters (fail2ban:NAME or a .conf path) have a mode")
            values["mode"] = self.scalar_text(entry["mode"][1], f"{key}.mode")
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", values["mode"]):
                self.fail(entry["mode"][1], f"{key}.mode", f"{values['mode']!r} is not a mode name")
        where = entry["path" if "path" in entry else "journal"][1]
        return LogSource(path=values.get("path"), filter=name, journal=values.get("journal"),
                         mode=values.get("mode"), journal_dir=values.get("journal_dir"),
                         path_line=where.start_mark.line + 1,
                         filter_line=entry["filter"][1].start_mark.line + 1)
