"""Reads a fail2ban filter.d definition, as fail2ban would, into plain strings.

Owns the file set (NAME.conf, NAME.d/*.conf, NAME.local, NAME.d/*.local),
[INCLUDES] before/after, the merge with `known/` values, `%(...)s`
interpolation (also `%(section/option)s`) and recursive `<tag>` substitution.
Written from fail2ban's documented behaviour; no fail2ban code is used.
"""
import configparser
import glob
import os
import re
from dataclasses import dataclass

from policyd.errors import InputError

DEFAULT_FILTER_DIR = "/etc/fail2ban/filter.d"
# The options a filter may set in [Definition] (fail2ban's filter reader reads these).
FILTER_OPTIONS = ("usedns", "prefregex", "ignoreregex", "failregex", "maxlines",
                  "datepattern", "journalmatch")
MAX_DEPTH = 10          # %(...)s nesting, as configparser allows
MAX_TAG_ROUNDS = 25     # <tag> replacements of one name inside one value


@dataclass(frozen=True)
class FilterDefinition:
    name: str
    path: str               # NAME.conf, the file errors name
    files: tuple            # every file read, in order
    failregex: tuple
    ignoreregex: tuple
    prefregex: str | None
    datepatterns: tuple     # one template per line; () = fail2ban's defaults
    maxlines: int
    usedns: str
    journalmatch: str | None


# The syntax fail2ban's reader adds to configparser's.
_TAG = re.compile(r"<([^ <>]+)>")
_INTERPOLATION = re.compile(r"%%|%\(([^)]+)\)s")
_SECTION_OPTION = re.compile(r"^([\w\-]+)/([^\s>]+)$")
_CONDITIONAL = re.compile(r"^(\w+)(\?.+)$")


class _RawParser(configparser.RawConfigParser):
    """One file as fail2ban reads it: `;` inline comments, lower-case option names."""

    def __init__(self):
        super().__init__(interpolation=None, inline_comment_prefixes=(";",), strict=False)

    def own_sections(self):
        return {name: dict(values) for name, values in self._sections.items()}


class ConfigSet:
    """Files merged in order; a section seen again keeps the older values as KNOWN/."""

    def __init__(self):
        self.defaults = {}
        self.sections = {}
        self.known = {}
        self.files = []

    def read_stack(self, path):
        for file in _with_includes(path, seen=()):
            self._merge(file)

    def _merge(self, file):
        parser = _read(file)
        self.files.append(file)
        self.defaults.update(parser.defaults())
        for name, values in parser.own_sections().items():
            condition = _CONDITIONAL.match(name)
            if condition:
                name, suffix = condition.groups()
                values = {key + suffix: value for key, value in values.items()}
            older = self.sections.get(name)
            if older is None:
                self.sections[name] = dict(values)
                continue
            self.known.setdefault(name, {}).update(
                {key: older[key] for key in values if key in older})
            older.update(values)

    # -- values --------------------------------------------------------

    def raw(self, section, option, vars):
        option = option.lower()
        for source in (vars, self.sections.get(section, {}), self.defaults):
            if option in source:
                return source[option]
        raise KeyError(option)

    def get(self, section, option, vars=None):
        """The interpolated value; KeyError if the option is nowhere."""
        vars = {k.lower(): v for k, v in (vars or {}).items()}
        if "/" in option:
            found = _SECTION_OPTION.match(option)
            if found:
                target = found.group(1)
                value = self._section_ref(section, target, found.group(2).lower())
                if value is not None:
                    # Read in the referenced section, where its own %(...)s resolve.
                    context = section if target.lower() in ("known", "default") else target
                    return self._expand(value, context, {}, 0)
        return self._expand(self.raw(section, option, vars), section, vars, 0)

    def _section_ref(self, section, target, option):
        """The raw value of `target/option`: a section, `known` or `default`."""
        lowered = target.lower()
        if lowered == "known":
            value = self.known.get(section, {}).get(option)
            return value if value is not None else self.defaults.get(option)
        if lowered == "default":
            return self.defaults.get(option)
        values = self.sections.get(target)
        if values is None:
            return None
        return values.get(option, self.defaults.get(option))

    def _expand(self, value, section, vars, depth):
        if depth > MAX_DEPTH:
            raise InputError(f"%(...)s nested deeper than {MAX_DEPTH} in section [{section}]",
                             file=self.files[-1] if self.files else None)

        def replace(found):
            if found.group(0) == "%%":
                return "%"
            name = found.group(1).lower()
            if "/" in name:
                target, _, option = name.partition("/")
                referenced = self._section_ref(section, target, option)
                if referenced is None:
                    raise InputError(f"%({name})s refers to nothing", file=self.files[-1],
                                     key=section)
            else:
                try:
                    referenced = self.raw(section, name, vars)
                except KeyError:
                    raise InputError(f"%({name})s is not defined", file=self.files[-1],
                                     key=section) from None
            return self._expand(referenced, section, vars, depth + 1)

        return _INTERPOLATION.sub(replace, value)


def _read(path):
    parser = _RawParser()
    try:
        with open(path, encoding="utf-8") as stream:
            parser.read_file(stream, source=path)
    except (OSError, UnicodeDecodeError, configparser.Error) as error:
        raise InputError(f"cannot read fail2ban config: {error}", file=path) from None
    return parser


def _with_includes(path, seen):
    """path with its [INCLUDES] before/after (each with its .local), depth first."""
    if path in seen or not os.path.isfile(path):
        return []
    parser = _read(path)
    before, after = [], []
    if parser.has_section("INCLUDES"):
        for option, target in (("before", before), ("after", after)):
            if not parser.has_option("INCLUDES", option):
                continue
            for name in parser.get("INCLUDES", option).split("\n"):
                name = name.strip()
                if not name:
                    continue
                included = name if os.path.isabs(name) else os.path.join(os.path.dirname(path), name)
                for file in _with_local(included):
                    target.extend(_with_includes(file, seen + (path,)))
    return before + [path] + after


def _with_local(path):
    local = os.path.splitext(path)[0] + ".local"
    return [path, local] if local != path and os.path.isfile(local) else [path]


def filter_files(base):
    """fail2ban's file set for one filter: base.conf, base.d/*.conf, base.local, base.d/*.local."""
    return [f for f in [base + ".conf", *sorted(glob.glob(base + ".d/*.conf")),
                        base + ".local", *sorted(glob.glob(base + ".d/*.local"))]
            if os.path.isfile(f)]


def locate(name_or_path, filter_dir=DEFAULT_FILTER_DIR):
    """(name, base path without .conf) for `sshd` or `/path/to/sshd.conf`."""
    text = str(name_or_path)
    if text.endswith(".conf") and "/" in text:
        base = text[:-len(".conf")]
    else:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text):
            raise InputError(f"invalid fail2ban filter name {text!r}", key="filter")
        base = os.path.join(filter_dir, text)
    if not os.path.isfile(base + ".conf") and not os.path.isfile(base + ".local"):
        raise InputError(f"no fail2ban filter {base}.conf", key="filter")
    return os.path.basename(base), base


def read_filter(name_or_path, options=None, filter_dir=DEFAULT_FILTER_DIR):
    """The filter's definition with jail-style options (e.g. {"mode": "aggressive"})."""
    name, base = locate(name_or_path, filter_dir)
    config = ConfigSet()
    for file in filter_files(base):
        config.read_stack(file)
    if "Definition" not in config.sections:
        raise InputError("fail2ban filter has no [Definition] section", file=base + ".conf")
    given = {k.lower(): str(v) for k, v in (options or {}).items()}
    values = {}
    for option in FILTER_OPTIONS:
        if option in given:
            continue
        try:
            values[option] = config.get("Definition", option, given)
        except KeyError:
            pass
    init = dict(given)
    for option in config.sections.get("Init", {}):
        value = config.get("Init", option, {})
        if not option.startswith("known/"):
            init.setdefault("known/" + option, value)
        init.setdefault(option, value)
    combined = {**values, **init}
    ignore = {m.group(1) for m in map(_CONDITIONAL.match, combined) if m}

    def lookup(tag):
        try:
            return config.get("Definition", tag, given)
        except KeyError:
            return None

    resolved = substitute_tags(combined, lookup, ignore, file=base + ".conf")
    maxlines_text = resolved.get("maxlines") or "1"
    try:
        maxlines = int(maxlines_text)
    except ValueError:
        raise InputError(f"maxlines {maxlines_text!r} is not an integer", file=base + ".conf",
                         key="maxlines") from None
    return FilterDefinition(
        name=name, path=base + ".conf", files=tuple(config.files),
        failregex=_lines(resolved.get("failregex")),
        ignoreregex=_lines(resolved.get("ignoreregex")),
        prefregex=resolved.get("prefregex") or None,
        datepatterns=_lines(resolved.get("datepattern")),
        maxlines=maxlines,
        usedns=(resolved.get("usedns") or "warn").strip(),
        journalmatch=resolved.get("journalmatch") or None)


def _lines(value):
    return tuple(line for line in (value or "").split("\n") if line.strip())


def substitute_tags(tags, lookup, ignore=(), file=None):
    """Replace <name> by its value, recursively; unknown tags (<HOST>, <F-USER>) stay."""
    tags = dict(tags)
    done = set()
    counts = {}
    while True:
        again = False
        for name in list(tags):
            if name in ignore or name in done:
                continue
            value = original = str(tags[name])
            seen = counts.setdefault(name, {})
            found = _TAG.search(value)
            while found:
                tag = found.group(1)
                if tag in ignore:
                    found = _TAG.search(value, found.end())
                    continue
                if tag == name or seen.get(tag, 0) >= MAX_TAG_ROUNDS:
                    raise InputError(f"<{tag}> refers to itself in {name}", file=file, key=name)
                replacement = tags.get(tag)
                if replacement is None:
                    replacement = lookup(tag)
                if replacement is None:
                    found = _TAG.search(value, found.end())
                    continue
                value = value.replace(f"<{tag}>", str(replacement))
                seen[tag] = seen.get(tag, 0) + 1
                found = _TAG.search(value, found.start())
            if value != original:
                tags[name] = value
                if _TAG.search(value):
                    again = True
            if "<" not in value:
                done.add(name)
        if not again:
            return tags
