"""Filter files: loading filters/NAME.yaml (or a fail2ban filter) into a policyd.logs.filters.Filter.

Owns the file format and its validation (every error as file:line: key); the
matching itself is policyd.logs.filters', the offline scan policyd.logs.scan's.

Filter file format (YAML mapping; unknown keys are errors):

    description: free text
    rules:                      # tried in order; the first rule that matches wins
      - contains: ["password mismatch", "was not found in"]
        regex: '^(?P<time>\\d{4}/\\d\\d/\\d\\d \\d\\d:\\d\\d:\\d\\d) ... client: (?P<host>[0-9A-Fa-f:.]+), server: '
        time_format: '%Y/%m/%d %H:%M:%S'   # for the group `time` (or json.time); see policyd.logs.logtime
      - contains: ['"status":401']
        json:
          match: {status: 401}              # dotted path -> value (or list of values)
          match_regex: {msg: '^Unsuccessful '}  # dotted path -> anchored regex on a string
          host: [request.client_ip, request.remote_ip]  # first path that is present
          present: [request.headers.Authorization]      # path must exist
          nonempty: [ClientUsername]        # path must exist and not be "", "-", [], {}
          time: StartUTC                    # the line's own time, read with time_format
    ignore:                     # anchored regexes; a matching line is never a failure
      - '^\\S+ \\S+ \\[info\\] .* no user/password was provided'
    guard:                      # how a request could write a line into this log: policyd.logs.guard
      kind: nginx-error         # or `continuation` with `whole` and `sender` regexes

`contains` is the speed trick: a line that holds none of the listed substrings is
IGNORED without running the regex or parsing JSON. `regex` must start with `^`
and have a named group `host`; it runs on bytes, only the host is decoded and
passed to policyd.addr.parse_host. A host that is not exactly one address makes
the line MALFORMED, never a ban. Lines over MAX_LINE_BYTES, lines with NUL bytes,
candidate JSON lines that do not parse as a JSON object, and candidate text lines
that match no rule and are not UTF-8 are MALFORMED."""
import os
import re

from policyd.errors import InputError
from policyd.logs.filters import Filter, _JsonRule, _RegexRule
from policyd.logs.logtime import TimeParser, valid_format

# Paths as text: pathlib (with urllib.parse) is a tenth of test-filter's start-up.
DEFAULT_SEARCH_DIRS = (
    os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))), "filters"),
    "/usr/share/policyd/filters",
    "/etc/policyd/filters",
)
_FILTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_TOP_KEYS = {"description", "rules", "ignore", "guard"}
_RULE_KEYS = {"contains", "regex", "json", "time_format"}
_JSON_KEYS = {"match", "match_regex", "host", "present", "nonempty", "time"}
_GUARD_KEYS = {"kind", "entry_max_bytes", "whole", "sender"}
GUARD_KINDS = ("nginx-error", "continuation")


def load_filter(name_or_path, search_dirs=None, mode=None, journal=False, cache=False):
    """Load a filter by bare name (searched in search_dirs) or by path;
    `fail2ban:NAME` or a .conf path loads a fail2ban filter.d filter.
    cache: `policyd test-filter` keeps parsed filters (policyd.logs.filtercache)."""
    text = str(name_or_path)
    if text.startswith("fail2ban:") or text.endswith(".conf"):
        from policyd.logs.fail2ban.engine import load
        return load(text.removeprefix("fail2ban:"), mode=mode, journal=journal)
    if mode is not None:
        raise InputError(f"filter {text!r} has no modes (only fail2ban filters do)", key="mode")
    if "/" in text or text.endswith(".yaml"):
        return _load_file(text, cache)
    if not _FILTER_NAME.match(text):
        raise InputError(f"invalid filter name {text!r}", key="filter")
    dirs = DEFAULT_SEARCH_DIRS if search_dirs is None else search_dirs
    for directory in dirs:
        candidate = os.path.join(directory, f"{text}.yaml")
        if os.path.isfile(candidate):
            return _load_file(candidate, cache)
    searched = ", ".join(str(d) for d in dirs)
    raise InputError(f"unknown filter {text!r} (searched {searched})", key="filter")


def _load_file(path, cache=False):
    """cache: keep the parsed filter in policyd.logs.filtercache (test-filter only)."""
    try:
        with open(path, "rb") as stream:
            data = stream.read()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read filter: {error}", file=path) from None
    if not cache:
        return _parse(path, text)
    from policyd.logs import filtercache
    cached = filtercache.read(path, data)
    if cached is None:
        cached = _parse(path, text)
        filtercache.write(data, cached)
    return cached


def _parse(path, text):
    import yaml  # here, not at the top: policyd.logs.filtercache spares test-filter its import
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise InputError(f"invalid YAML: {getattr(error, 'problem', error)}", file=path,
                         line=mark.line + 1 if mark else None) from None
    loader = _Loader(path)
    if root is None:
        raise InputError("empty filter file", file=path)
    top = loader.mapping(root, _TOP_KEYS, "filter")
    if "rules" not in top:
        raise InputError("missing key", file=path, line=root.start_mark.line + 1, key="rules")
    rules_node = top["rules"]
    rule_nodes = loader.sequence(rules_node, "rules")
    if not rule_nodes:
        loader.fail(rules_node, "rules", "at least one rule is required")
    rules = [loader.rule(node, f"rules[{i}]") for i, node in enumerate(rule_nodes)]
    ignore = []
    if "ignore" in top:
        for i, node in enumerate(loader.sequence(top["ignore"], "ignore")):
            ignore.append(loader.regex(node, f"ignore[{i}]", need_host=False))
    if "description" in top:
        loader.string(top["description"], "description")
    guard = loader.guard(top["guard"]) if "guard" in top else None
    stem = os.path.splitext(os.path.basename(path))[0]
    return Filter(stem, rules, ignore, source=path, guard=guard)


class _Loader:
    """Turns composed YAML nodes into rules, failing with file:line: key."""

    def __init__(self, path):
        self.path = path
        import yaml
        from yaml.constructor import SafeConstructor
        self.yaml, self.constructor = yaml, SafeConstructor()

    def fail(self, node, key, message):
        raise InputError(message, file=self.path, line=node.start_mark.line + 1, key=key)

    def mapping(self, node, allowed, key):
        if not isinstance(node, self.yaml.MappingNode):
            self.fail(node, key, "must be a mapping")
        result = {}
        for key_node, value_node in node.value:
            name = self.value(key_node)
            where = f"{key}.{name}" if key != "filter" else str(name)
            if not isinstance(name, str):
                self.fail(key_node, where, "keys must be strings")
            if allowed is not None and name not in allowed:
                self.fail(key_node, where, f"unknown key (allowed: {', '.join(sorted(allowed))})")
            if name in result:
                self.fail(key_node, where, "duplicate key")
            result[name] = value_node
        return result

    def sequence(self, node, key):
        if not isinstance(node, self.yaml.SequenceNode):
            self.fail(node, key, "must be a list")
        return node.value

    def value(self, node):
        return self.constructor.construct_object(node, deep=True)

    def string(self, node, key):
        value = self.value(node) if isinstance(node, self.yaml.ScalarNode) else None
        if not isinstance(value, str) or not value:
            self.fail(node, key, "must be a non-empty string")
        return value

    def strings(self, node, key):
        return [self.string(n, f"{key}[{i}]") for i, n in enumerate(self.sequence(node, key))]

    def regex(self, node, key, need_host, as_bytes=True):
        pattern = self.string(node, key)
        if not pattern.startswith(("^", r"\A")):
            self.fail(node, key, "regex must be anchored with ^ (an unanchored regex lets log "
                                 "text an attacker wrote choose the host)")
        try:
            compiled = re.compile(pattern.encode("utf-8") if as_bytes else pattern)
        except re.error as error:
            self.fail(node, key, f"bad regex: {error}")
        if need_host and "host" not in compiled.groupindex:
            self.fail(node, key, "regex needs a named group (?P<host>...)")
        return compiled

    def rule(self, node, key):
        fields = self.mapping(node, _RULE_KEYS, key)
        contains = ()
        if "contains" in fields:
            contains = tuple(s.encode("utf-8") for s in self.strings(fields["contains"], f"{key}.contains"))
        if ("regex" in fields) == ("json" in fields):
            self.fail(node, key, "a rule needs exactly one of `regex` or `json`")
        time_parser = None
        if "time_format" in fields:
            time_format = self.string(fields["time_format"], f"{key}.time_format")
            problem = valid_format(time_format)
            if problem:
                self.fail(fields["time_format"], f"{key}.time_format", problem)
            time_parser = TimeParser(time_format)
        if "regex" in fields:
            regex = self.regex(fields["regex"], f"{key}.regex", need_host=True)
            if ("time" in regex.groupindex) != (time_parser is not None):
                self.fail(fields["regex"], f"{key}.regex",
                          "a named group (?P<time>...) and time_format go together")
            return _RegexRule(regex, contains, time_parser)
        return self.json_rule(fields["json"], f"{key}.json", contains, time_parser)

    def guard(self, node):
        fields = self.mapping(node, _GUARD_KEYS, "guard")
        if "kind" not in fields:
            self.fail(node, "guard.kind", "missing key")
        kind = self.string(fields["kind"], "guard.kind")
        if kind not in GUARD_KINDS:
            self.fail(fields["kind"], "guard.kind", f"must be one of {', '.join(GUARD_KINDS)}")
        guard = {"kind": kind}
        if kind == "nginx-error":
            size = self.value(fields["entry_max_bytes"]) if "entry_max_bytes" in fields else 2048
            if type(size) is not int or not 256 <= size <= 1 << 20:
                self.fail(fields.get("entry_max_bytes", node), "guard.entry_max_bytes",
                          "must be an integer from 256 to 1048576 (nginx's NGX_MAX_ERROR_STR)")
            guard["entry_max_bytes"] = size
            unused = {"whole", "sender"} & set(fields)
        else:
            for name in ("whole", "sender"):
                if name not in fields:
                    self.fail(node, f"guard.{name}", "missing key (a continuation guard needs it)")
            guard["whole"] = self.regex_any(fields["whole"], "guard.whole")
            guard["sender"] = self.regex(fields["sender"], "guard.sender", need_host=True)
            unused = {"entry_max_bytes"} & set(fields)
        if unused:
            name = sorted(unused)[0]
            self.fail(fields[name], f"guard.{name}", f"not used by kind {kind}")
        return guard

    def regex_any(self, node, key):
        """An unanchored regex (searched, not matched), compiled for bytes."""
        pattern = self.string(node, key)
        try:
            return re.compile(pattern.encode("utf-8"))
        except re.error as error:
            self.fail(node, key, f"bad regex: {error}")

    def json_rule(self, node, key, contains, time_parser=None):
        fields = self.mapping(node, _JSON_KEYS, key)
        if "host" not in fields:
            self.fail(node, f"{key}.host", "missing key: a JSON rule needs host paths")
        hosts = [_path(p) for p in self.strings(fields["host"], f"{key}.host")]
        if not hosts:
            self.fail(fields["host"], f"{key}.host", "at least one host path is required")
        match = []
        if "match" in fields:
            for name, value_node in self.mapping(fields["match"], None, f"{key}.match").items():
                value = self.value(value_node)
                wanted = value if isinstance(value, list) else [value]
                if not wanted or not all(isinstance(w, (str, int, float, bool)) for w in wanted):
                    self.fail(value_node, f"{key}.match.{name}", "must be a scalar or a list of scalars")
                match.append((_path(name), tuple(wanted)))
        match_regex = []
        if "match_regex" in fields:
            for name, value_node in self.mapping(fields["match_regex"], None, f"{key}.match_regex").items():
                pattern = self.regex(value_node, f"{key}.match_regex.{name}", need_host=False, as_bytes=False)
                match_regex.append((_path(name), pattern))
        present = ([_path(p) for p in self.strings(fields["present"], f"{key}.present")]
                   if "present" in fields else [])
        nonempty = ([_path(p) for p in self.strings(fields["nonempty"], f"{key}.nonempty")]
                    if "nonempty" in fields else [])
        time_path = _path(self.string(fields["time"], f"{key}.time")) if "time" in fields else None
        if (time_path is None) != (time_parser is None):
            self.fail(node, f"{key}.time", "json.time and the rule's time_format go together")
        return _JsonRule(contains, match, match_regex, hosts, present, nonempty, time_path, time_parser)


def _path(dotted):
    return tuple(dotted.split("."))
