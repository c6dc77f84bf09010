"""Runs a fail2ban filter definition over log lines: policyd's Filter interface.

Owns fail2ban's regex tags (<HOST> as an address only, <ADDR>, <IP4>, <IP6>,
<CIDR>, <SUBNET>, <F-...> groups), prefregex with <F-CONTENT>, ignoreregex,
<F-NOFAIL>, the <F-MLFID> connection cache (sshd names the address once per
connection) and, through multiline.py, maxlines. No fail2ban code is used.
"""
import functools
import ipaddress
import re
import time

from policyd.errors import InputError
from policyd.logs.fail2ban import connections, literals, offline
from policyd.logs.fail2ban import multiline as multiline_mod
from policyd.logs.fail2ban.config import read_filter
from policyd.logs.fail2ban.dates import DateCutter
from policyd.logs.filters import MAX_LINE_BYTES, Failure, Outcome

_IP4 = r"(?:\d{1,3}\.){3}\d{1,3}"
_IP6 = r"(?:[0-9a-fA-F]{1,4}::?|::){1,7}(?:[0-9a-fA-F]{1,4}|(?<=:):)"
_IP4_GROUP = rf"(?:::f{{4,6}}:)?(?P<ip4>{_IP4})"
_IP6_GROUP = rf"(?P<ip6>{_IP6})"
_ADDR = rf"\[?(?:{_IP4_GROUP}|{_IP6_GROUP})\]?"
_CIDR = r"(?P<cidr>\d+)"
# policyd never resolves names (usedns = no): <HOST> is an address, never a DNS name.
STATIC_TAGS = {
    "HOST": _ADDR, "ADDR": _ADDR, "F-ADDR/": _ADDR,
    "IP4": _IP4_GROUP, "F-IP4/": _IP4_GROUP,
    "IP6": _IP6_GROUP, "F-IP6/": _IP6_GROUP,
    "CIDR": _CIDR, "F-CIDR/": _CIDR,
    "SUBNET": rf"\[?(?:{_IP4_GROUP}|{_IP6_GROUP})(?:/{_CIDR})?\]?",
    "F-SUBNET/": rf"\[?(?:{_IP4_GROUP}|{_IP6_GROUP})(?:/{_CIDR})?\]?",
    "F-ID/": r"(?P<fid>\S+)",
    "F-PORT/": r"(?P<fport>\w+)",
}
_GROUP_ALIASES = {"id": "fid", "port": "fport"}
_ANY_TAG = re.compile(r"</?[\w\-]+/?>")
_CUSTOM_TAG = re.compile(r"^(/?)F-([A-Z0-9_\-]+)$")
_GLOBAL_TO_LOCAL_FLAGS = re.compile(r"(?<!\\)\((?:\?:)?(\(\?[a-z]+)\)")
# A failregex must capture one of these (itself or through prefregex), as in fail2ban.
FAILURE_ID_GROUPS = {"ip4", "ip6", "fid", "mlfid"}


def tags_to_regex(regex, multiline=False):
    """fail2ban's tags -> named groups: <F-USER>..</F-USER> -> (?P<user>..), <HOST> -> address."""
    opened = set()
    skips = []

    def replace(found):
        tag = found.group()
        name = tag[1:-1]
        if name in STATIC_TAGS:
            return STATIC_TAGS[name]
        if name == "SKIPLINES":
            if not multiline:
                raise InputError("<SKIPLINES> needs maxlines > 1", key="failregex")
            skips.append(None)
            return multiline_mod.skiplines_regex(len(skips) - 1)
        custom = _CUSTOM_TAG.match(name)
        if not custom:
            return tag
        closing, custom_name = custom.groups()
        if closing:
            return ")" if custom_name in opened else tag
        opened.add(custom_name)
        group = custom_name.lower()
        return f"(?P<{_GROUP_ALIASES.get(group, group)}>"

    return _GLOBAL_TO_LOCAL_FLAGS.sub(r"\1:", _ANY_TAG.sub(replace, regex))


_TAG_REFERENCE = re.compile(r"(?<!\(\?P)<([\w-]+)>")


def _unresolved_tag(regex, mode):
    """A <name> naming the mode, left after substitution: the mode is not defined."""
    for found in _TAG_REFERENCE.finditer(regex):
        if mode in found.group(1).split("-"):
            return found.group(1)
    return None


def _compile(regex, key, multiline=False):
    text = tags_to_regex(regex, multiline)
    if not text.strip():
        raise InputError("empty regex", key=key)
    try:
        return re.compile(text, re.MULTILINE if multiline else 0)
    except re.error as error:
        raise InputError(f"regex does not compile: {error}: {regex!r}", key=key) from None


class Fail2banFilter:
    """A fail2ban filter.d filter behind policyd's Filter interface (classify bytes)."""

    # No forged-line guard (policyd.logs.guard): the regexes are fail2ban's, unmodified,
    # and each filter's injection resistance is stated in filters/README.md.
    guard = None

    prefilter = ()          # policyd.logs.filters.scan uses scan_region() instead

    def __init__(self, definition, clock=time.time, name=None, mode=None):
        multiline = definition.maxlines > 1
        if multiline and definition.prefregex:
            raise InputError(
                f"fail2ban filter {definition.name}: maxlines = {definition.maxlines} together "
                "with a prefregex is not supported by policyd", file=definition.path,
                key="maxlines")
        if not definition.failregex:
            raise InputError("fail2ban filter has no failregex", file=definition.path,
                             key="failregex")
        if mode:
            for regex in (*definition.failregex, *definition.ignoreregex,
                          definition.prefregex or ""):
                unknown = _unresolved_tag(regex, mode)
                if unknown:
                    raise InputError(f"mode {mode!r}: <{unknown}> is not defined in the "
                                     "filter (a mode it does not have?)", file=definition.path,
                                     key="mode")
        self.definition = definition
        self.name = name or f"fail2ban:{definition.name}"
        self.source = definition.path
        self.clock = clock
        where = definition.path
        try:
            self.prefregex = _compile(definition.prefregex, "prefregex") if definition.prefregex else None
            self.failregex = [_compile(r, "failregex", multiline) for r in definition.failregex]
            self.ignoreregex = [_compile(r, "ignoreregex", multiline) for r in definition.ignoreregex]
        except InputError as error:
            raise InputError(error.message, file=where, key=error.key) from None
        prefix_ids = set(self.prefregex.groupindex) if self.prefregex else set()
        for regex, text in zip(self.failregex, definition.failregex):
            if not (set(regex.groupindex) | prefix_ids) & FAILURE_ID_GROUPS:
                raise InputError(f"failregex names no address or failure id: {text!r}",
                                 file=where, key="failregex")
        # With a required substring for every failregex the per-regex checks below
        # are cheaper than one search of the whole alternation.
        self.any_failregex = None
        self.scan_tokens = literals.tokens([r.pattern for r in self.failregex])
        # Per failregex, in order: (regex, substrings one of which it needs or None,
        # whether it has <F-ALT_..>/<F-TUPLE_..> groups to merge).
        self.plan = [(r, literals.required_literals(r.pattern),
                      any(k.startswith(("alt_", "tuple_")) for k in r.groupindex))
                     for r in self.failregex]
        # maxlines > 1: a window of lines; the offline scan must then see every line.
        self.window = multiline_mod.LineWindow(definition.maxlines) if multiline else None
        if multiline:
            self.scan_tokens = None
        elif self.scan_tokens is None:
            self.any_failregex = _alternation(self.failregex)
        self.content_group = self.prefregex is not None and "content" in self.prefregex.groupindex
        self.dates = DateCutter(definition.datepatterns, now=clock)
        # fail2ban tries ignoreregex before prefregex only when there are few of them.
        self.ignore_first = bool(self.ignoreregex) and (
            len(self.ignoreregex) < len(self.failregex) - 2)
        self.connections = connections.ConnectionCache(clock)

    def __repr__(self):
        return f"Fail2banFilter({self.name!r})"

    def classify(self, line):
        """Failure(host, filter), Outcome.IGNORED or Outcome.MALFORMED; never raises.
        A Failure carries the line's own Unix time as `.time` (None: no date found)."""
        outcome, when = self.classify_timed(line)
        if isinstance(outcome, Failure):
            outcome = _with_time(outcome, when)
        return outcome

    def classify_timed(self, line, when=None, want_time=True):
        """(outcome, the line's Unix time or None). `when` given: the line has no date
        (a journal MESSAGE): matching starts on the line as it is."""
        if line.endswith(b"\n"):
            line = line[:-1]
        if len(line) > MAX_LINE_BYTES or b"\x00" in line or b"\n" in line:
            return Outcome.MALFORMED, None
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return Outcome.MALFORMED, None
        return self.classify_text(text, when, want_time)

    def classify_text(self, text, when=None, want_time=True):
        clock = None
        if when is None:
            text, clock = self.dates.cut(text)
        try:
            outcome = self._match(text + "\n")
        except (ValueError, KeyError, TypeError):
            outcome = Outcome.MALFORMED
        if want_time and clock is not None and isinstance(outcome, Failure):
            when = clock()
        return outcome, when

    def _match(self, buffer):
        if self.window is not None:
            return self._match_window(buffer[:-1])
        if self.ignore_first and self._ignored(buffer):
            return Outcome.IGNORED
        prefix = None
        if self.prefregex is not None:
            prefix = self.prefregex.search(buffer)
            if prefix is None:
                return Outcome.IGNORED
            if self.content_group:
                content = prefix.group("content")
                if content:
                    buffer = content + "\n"
        if self.any_failregex is not None and self.any_failregex.search(buffer) is None:
            return Outcome.IGNORED
        for regex, needs, composite in self.plan:
            if needs is not None:
                # A regex whose required text is not in the line cannot match it.
                for token in needs:
                    if token in buffer:
                        break
                else:
                    continue
            found = regex.search(buffer)
            if found is None:
                continue
            if self.ignoreregex and self._ignored(buffer):
                return Outcome.IGNORED
            groups = prefix.groupdict() if prefix is not None else {}
            groups.pop("content", None)
            groups.update(found.groupdict())
            if composite:
                _merge_alternates(groups)
            return self._failure(groups)
        return Outcome.IGNORED

    def _match_window(self, line):
        """maxlines > 1: the regexes search the last lines; a match consumes its lines."""
        window = self.window
        window.push(line)
        buffer = window.text()
        if self.ignore_first and self._ignored(buffer):
            return Outcome.IGNORED
        for regex, needs, composite in self.plan:
            if needs is not None and not any(token in buffer for token in needs):
                continue
            found = regex.search(buffer)
            if found is None:
                continue
            covered, window.lines = window.split(found)
            if self.ignoreregex and self._ignored("\n".join(covered) + "\n"):
                return Outcome.IGNORED
            groups = found.groupdict()
            if composite:
                _merge_alternates(groups)
            return self._failure(groups)
        return Outcome.IGNORED

    def scan_region(self, buffer, end, result, hosts):
        """policyd.logs.filters.scan's hook: buffer[:end] is whole lines (see offline.py)."""
        offline.scan_region(self, buffer, end, result, hosts)

    def _ignored(self, buffer):
        return any(regex.search(buffer) for regex in self.ignoreregex)

    def _failure(self, groups):
        connection = groups.get("mlfid")
        if connection is not None:
            groups = connections.merge(self.connections, connection, groups)
            if groups.get("nofail"):
                return Outcome.IGNORED
        host = groups.get("ip4") or groups.get("ip6")
        if host is None:
            host = groups.get("fid")
            if host is None:
                if connection is not None:
                    groups["mlfpending"] = 1   # a failure whose address comes later
                return Outcome.IGNORED
        if groups.get("nofail"):
            return Outcome.IGNORED
        address = _address(host)
        if address is None:
            return Outcome.MALFORMED
        return Failure(address, self.name)


_COMPOSITE_NAME = re.compile(r"^(alt_|tuple_)(.*?)(?:_\d+)?$")


_NAMED = re.compile(r"\(\?P<(\w+)>|\(\?P=(\w+)\)|\(\?\((\w+)\)")
_NUMBERED_REFERENCE = re.compile(r"\\[1-9]|\(\?\(\d+\)")


def _alternation(regexes):
    """All failregexes as one regex, to skip a line none of them matches in one C-level
    search (the regexes then run one by one, in order, only on lines it matches).
    Group names get a per-regex prefix so they cannot clash; None if not possible."""
    if len(regexes) < 2 or any(_NUMBERED_REFERENCE.search(r.pattern) for r in regexes):
        return None

    def renamed(index, pattern):
        def rename(found):
            name_def, reference, condition = found.groups()
            if name_def:
                return f"(?P<r{index}_{name_def}>"
            if reference:
                return f"(?P=r{index}_{reference})"
            return f"(?(r{index}_{condition})"
        return _NAMED.sub(rename, pattern)

    try:
        return re.compile("|".join(f"(?:{renamed(i, r.pattern)})" for i, r in enumerate(regexes)))
    except re.error:
        return None


def _merge_alternates(groups):
    """<F-ALT_USER> fills `user` when that is empty; <F-TUPLE_X> parts join `x`."""
    for name in sorted(k for k in groups if k.startswith(("alt_", "tuple_"))):
        kind, target = _COMPOSITE_NAME.match(name).groups()
        target = _GROUP_ALIASES.get(target, target)
        value = groups[name]
        if kind == "alt_":
            if value and not groups.get(target):
                groups[target] = value
        else:
            current = groups.get(target)
            groups[target] = (current + (value,)) if isinstance(current, tuple) else (current, value)


def _with_time(failure, when):
    """The Failure with the line's time: as a field where Failure has one, else as an
    attribute (equality stays that of host and filter)."""
    try:
        return Failure(failure.host, failure.filter, time=when)
    except TypeError:
        object.__setattr__(failure, "time", when)
        return failure


@functools.lru_cache(maxsize=4096)
def _address(text):
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def load(name_or_path, mode=None, options=None, clock=time.time, filter_dir=None, journal=False):
    """`sshd` or a path ending in .conf -> Fail2banFilter; mode is the jail's `mode`;
    journal: lines are `IDENTIFIER[PID]: MESSAGE` from the journal (fail2ban's logtype)."""
    given = dict(options or {})
    if mode is not None:
        given["mode"] = mode
    if journal:
        given.setdefault("logtype", "journal")
    kwargs = {"filter_dir": filter_dir} if filter_dir else {}
    definition = read_filter(name_or_path, given, **kwargs)
    return Fail2banFilter(definition, clock=clock, mode=given.get("mode"))
