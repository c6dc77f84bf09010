"""A cache of parsed filter files for `policyd test-filter`, by their content.

Owns turning a loaded policyd.logs.filters.Filter into plain JSON and back, and the
cache directory (~/.cache/policyd/filters, or $XDG_CACHE_HOME): importing the
YAML machinery is a third of a small scan's start-up. An entry is named by the
BLAKE2b hash of the filter file's bytes (and this module's format), so an edited
filter is parsed and validated anew; entries, and the directory, are trusted
only when the current user owns them and nobody else can write them. The
daemon never uses it.
"""
import json
import os
import re
import stat

from policyd.logs.filters import Filter, _JsonRule, _RegexRule
from policyd.logs.logtime import TimeParser

try:
    from _blake2 import blake2b   # what hashlib gives, without loading OpenSSL at start-up
except ImportError:   # pragma: no cover (a Python built without it)
    from hashlib import blake2b

FORMAT = b"policyd filter cache 1\n"


def directory():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "policyd", "filters")


def key(data):
    return blake2b(FORMAT + data, digest_size=32).hexdigest()


def _trusted(status):
    return status.st_uid == os.geteuid() and not status.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def read(path, data):
    """The Filter cached for the filter file `path` holding `data`, or None."""
    where = directory()
    try:
        if not _trusted(os.stat(where)):
            return None
        fd = os.open(os.path.join(where, key(data) + ".json"), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as stream:
            if not (_trusted(os.fstat(fd)) and stat.S_ISREG(os.fstat(fd).st_mode)):
                return None
            return from_spec(json.loads(stream.read()), path)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, re.error):
        return None


def write(data, log_filter):
    """Cache `log_filter`, parsed from `data`; best effort (a cache never fails a command)."""
    where = directory()
    try:
        os.makedirs(where, mode=0o700, exist_ok=True)
        if not _trusted(os.stat(where)):
            return
        final = os.path.join(where, key(data) + ".json")
        temporary = f"{final}.{os.getpid()}.tmp"
        with open(temporary, "w", encoding="utf-8") as out:
            json.dump(to_spec(log_filter), out)
        os.replace(temporary, final)
    except (OSError, TypeError, ValueError):
        pass


def _pattern(compiled):
    source = compiled.pattern
    return source.decode("utf-8") if isinstance(source, bytes) else source


def _time_format(rule):
    return rule.time_parser.format if rule.time_parser is not None else None


def to_spec(log_filter):
    """Plain JSON for everything a Filter's matching reads."""
    rules = []
    for rule in log_filter.rules:
        spec = {"contains": [t.decode("utf-8") for t in rule.contains], "time_format": _time_format(rule)}
        if isinstance(rule, _RegexRule):
            spec["regex"] = _pattern(rule.regex)
        else:
            spec["json"] = {"match": [[list(p), list(w)] for p, w in rule.match],
                            "match_regex": [[list(p), _pattern(r)] for p, r in rule.match_regex],
                            "host": [list(p) for p in rule.host], "present": [list(p) for p in rule.present],
                            "nonempty": [list(p) for p in rule.nonempty],
                            "time": list(rule.time) if rule.time is not None else None}
        rules.append(spec)
    guard = dict(log_filter.guard) if log_filter.guard is not None else None
    for name in ("whole", "sender"):
        if guard and name in guard:
            guard[name] = _pattern(guard[name])
    return {"name": log_filter.name, "rules": rules, "guard": guard,
            "ignore": [_pattern(p) for p in log_filter.ignore]}


def from_spec(spec, path):
    """The Filter to_spec() described (patterns compiled as the loader compiles them)."""
    def compiled(source):
        return re.compile(source.encode("utf-8"))

    rules = []
    for rule in spec["rules"]:
        contains = tuple(t.encode("utf-8") for t in rule["contains"])
        parser = TimeParser(rule["time_format"]) if rule["time_format"] is not None else None
        if "regex" in rule:
            rules.append(_RegexRule(compiled(rule["regex"]), contains, parser))
            continue
        fields = rule["json"]
        rules.append(_JsonRule(
            contains, [(tuple(p), tuple(w)) for p, w in fields["match"]],
            [(tuple(p), re.compile(r)) for p, r in fields["match_regex"]],
            [tuple(p) for p in fields["host"]], [tuple(p) for p in fields["present"]],
            [tuple(p) for p in fields["nonempty"]],
            tuple(fields["time"]) if fields["time"] is not None else None, parser))
    guard = spec["guard"]
    if guard is not None:
        for name in ("whole", "sender"):
            if name in guard:
                guard[name] = compiled(guard[name])
    return Filter(spec["name"], rules, [compiled(p) for p in spec["ignore"]], source=path, guard=guard)
