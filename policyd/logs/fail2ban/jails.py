"""`policyd import-fail2ban`: fail2ban's enabled jails as policy YAML lines.

Owns reading jail.conf, jail.d/*.conf, jail.local, jail.d/*.local (with their
includes, e.g. paths-debian.conf) and deciding, jail by jail, what policyd can
express: a file or journal source with `filter: fail2ban:NAME` and its mode.
What it cannot express is named with the reason, never dropped silently.
"""
import glob
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field

from policyd.errors import InputError
from policyd.logs.fail2ban.config import ConfigSet, filter_files
from policyd.logs.fail2ban.engine import load
from policyd.policy.reader import JOURNAL_UNIT

DEFAULT_CONFIG_DIR = "/etc/fail2ban"
_FILTER_SPEC = re.compile(r"^\s*([\w.\-/]+)\s*(?:\[(.*)\])?\s*$", re.S)
_OPTION = re.compile(r'\s*([\w.\-]+)\s*=\s*(?:"([^"]*)"|\'([^\']*)\'|([^,]*))\s*(?:,|$)')
# Debian's OpenSSH unit is ssh.service; sshd.service is only an alias, and
# _SYSTEMD_UNIT always holds the real name.
UNIT_ALIASES = {"sshd.service": "ssh.service"}
TRUE = {"true", "yes", "1", "on", "enabled"}


@dataclass
class Imported:
    sources: list = field(default_factory=list)     # (comment, dict for bans.logs)
    skipped: list = field(default_factory=list)     # (jail, reason)
    notes: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    ignore: list = field(default_factory=list)
    ports: set = field(default_factory=set)
    files: list = field(default_factory=list)


def parse_filter_spec(text):
    """`sshd[mode=aggressive, x="y"]` -> ("sshd", {"mode": "aggressive", "x": "y"})."""
    found = _FILTER_SPEC.match(text or "")
    if not found:
        raise ValueError(f"unreadable filter setting {text!r}")
    options = {}
    for option in _OPTION.finditer(found.group(2) or ""):
        value = next(v for v in option.groups()[1:] if v is not None)
        options[option.group(1)] = value.strip()
    return found.group(1), options


def read_jails(config_dir=DEFAULT_CONFIG_DIR):
    config = ConfigSet()
    for file in filter_files(os.path.join(config_dir, "jail")):
        config.read_stack(file)
    if not config.files:
        raise InputError("no jail.conf or jail.local", file=os.path.join(config_dir, "jail.conf"))
    return config


def _get(config, jail, option, default=None):
    try:
        return config.get(jail, option, {"__name__": jail}).strip()
    except (KeyError, InputError):
        return default


def import_jails(config_dir=DEFAULT_CONFIG_DIR):
    config = read_jails(config_dir)
    result = Imported(files=list(config.files))
    for option in ("maxretry", "findtime", "bantime"):
        value = _get(config, "DEFAULT", option)
        if value:
            result.settings[option] = value
    for entry in (_get(config, "DEFAULT", "ignoreip") or "").split():
        try:
            result.ignore.append(str(ipaddress.ip_network(entry, strict=False)))
        except ValueError:
            result.notes.append(f"ignoreip {entry!r} is not an address (policyd never "
                                "resolves names): left out")
    for jail in config.sections:
        if jail in ("INCLUDES", "Definition", "Init") or jail.startswith("KNOWN/"):
            continue
        if (_get(config, jail, "enabled", "false") or "false").lower() not in TRUE:
            continue
        _import_jail(config, jail, config_dir, result)
    return result


def _import_jail(config, jail, config_dir, result):
    try:
        name, options = parse_filter_spec(_get(config, jail, "filter", jail))
    except ValueError as error:
        result.skipped.append((jail, str(error)))
        return
    mode = options.pop("mode", None) or None
    backend = (_get(config, jail, "backend", "auto") or "auto").split("[")[0]
    journal = backend.startswith("systemd")
    try:
        flt = load(name, mode=mode, options=options,
                   filter_dir=os.path.join(config_dir, "filter.d"), journal=journal)
    except InputError as error:
        result.skipped.append((jail, f"filter {name}: {error.message}"))
        return
    for option, setting in (("maxretry", "maxretry"), ("findtime", "findtime"),
                            ("bantime", "bantime")):
        value = _get(config, jail, option)
        if value and value != result.settings.get(setting):
            result.notes.append(f"jail {jail}: {option} = {value} (policyd has one {setting} "
                                f"for all logs: {result.settings.get(setting)})")
    for port in re.split(r"[,\s]+", _get(config, jail, "port", "") or ""):
        if port:
            result.ports.add(port)
    base = {"filter": f"fail2ban:{name}"}
    if mode:
        base["mode"] = mode
    if journal:
        unit = _journal_unit(flt.definition.journalmatch)
        if unit is None:
            result.skipped.append((jail, "backend = systemd but the filter's journalmatch names "
                                   "no _SYSTEMD_UNIT (policyd reads the journal by unit only)"))
            return
        result.sources.append((f"jail {jail} (backend {backend})", {"journal": unit, **base}))
        return
    paths = [p for p in (_get(config, jail, "logpath", "") or "").split("\n") if p.strip()]
    if not paths:
        result.skipped.append((jail, "no logpath"))
        return
    for raw in paths:
        path = raw.strip().split()[0]   # fail2ban allows "PATH tail|head"
        matches = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
        if not matches:
            result.skipped.append((jail, f"logpath {path} matches no file (policyd follows "
                                   "named files, not patterns)"))
            continue
        for match in matches:
            comment = f"jail {jail}"
            if not os.path.exists(match):
                unit = _journal_unit(flt.definition.journalmatch)
                comment += f"; {match} does not exist here" + (
                    f": its messages may be in the journal (journal: {unit})" if unit else "")
            result.sources.append((comment, {"path": match, **base}))


def _journal_unit(journalmatch):
    for term in (journalmatch or "").split():
        if term.startswith("_SYSTEMD_UNIT="):
            unit = term.split("=", 1)[1]
            unit = UNIT_ALIASES.get(unit, unit)
            return unit if JOURNAL_UNIT.match(unit) else None
    return None


def _port_numbers(ports):
    numbers, unknown = set(), []
    for port in ports:
        for part in port.split(","):
            try:
                if ":" in part:
                    unknown.append(part)   # a range: fail2ban's "all ports"
                else:
                    numbers.add(int(part) if part.isdigit() else socket.getservbyname(part))
            except OSError:
                unknown.append(part)
    return sorted(numbers), unknown


def to_yaml(result):
    """The `bans:` lines of a policy, with comments for what could not be expressed."""
    out = [f"# policyd import-fail2ban, from: {', '.join(result.files)}",
           "# Paste under the policy's top level and check with `policyd check`.", "bans:"]
    numbers, unknown = _port_numbers(result.ports)
    if numbers:
        out.append(f"  # fail2ban banned on ports {numbers}; policyd bans sources from its "
                   "guarded ports (bans.ports, default: every service port)")
    for port in unknown:
        out.append(f"  # port {port!r} has no policyd equivalent")
    for key in ("maxretry", "findtime", "bantime"):
        if key in result.settings:
            value = result.settings[key]
            out.append(f"  {key}: {value if re.fullmatch(r'[0-9]+[smhdw]?', value) else repr(value)}")
    if result.ignore:
        out.append("  ignore:")
        out += [f"    - {network}" for network in result.ignore]
    out.append("  logs:")
    if not result.sources:
        out.append("    []  # no enabled jail could be expressed")
    for comment, source in result.sources:
        out.append(f"    # {comment}")
        keys = list(source)
        out.append(f"    - {keys[0]}: {_scalar(source[keys[0]])}")
        out += [f"      {key}: {_scalar(source[key])}" for key in keys[1:]]
    for note in result.notes:
        out.append(f"# note: {note}")
    for jail, reason in result.skipped:
        out.append(f"# not imported: jail {jail}: {reason}")
    return "\n".join(out) + "\n"


def _scalar(value):
    return f'"{value}"' if ":" in value or value.startswith(("{", "[", "*", "&", "!")) else value
