"""fail2ban's own annotated sample logs, run through policyd's fail2ban engine.

Reads fail2ban/tests/files/logs/NAME (installed with Debian's fail2ban) the way
fail2ban's sample test reads them: `# failJSON:` before a line says whether it
must match and which host, `# filterOptions:` / `# fileOptions:` switch filter
options (mode, logtype), `# addFILE:` pulls in another sample. Only the sample
files and filter.d are used; no fail2ban code runs.

`python3 tests/fail2ban_corpus.py` prints the markdown table for filters/README.md.
"""
import datetime
import ipaddress
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field

FILTER_DIR = "/etc/fail2ban/filter.d"
SAMPLE_DIR = "/usr/lib/python3/dist-packages/fail2ban/tests/files/logs"
# The samples' clock: Sun Aug 14 12:00:00 CEST 2005, in CET/CEST.
SAMPLE_NOW = 1124013600
SAMPLE_TZ = "CET-01CEST-02,M3.5.0,M10.5.0"
_DIRECTIVE = re.compile(r"^#+ ?(failJSON|(?:file|filter)Options|addFILE):(.+)$")


@dataclass
class Result:
    name: str
    lines: int = 0
    agree: int = 0
    names_skipped: int = 0      # expected host is a DNS name: policyd never bans names
    problems: list = field(default_factory=list)
    refused: str | None = None
    anchored: bool = False          # every failregex starts at ^ (of the line or content)
    free_text_before_host: bool = False  # a wildcard or user field precedes the address

    @property
    def ok(self):
        return self.refused is None and not self.problems and self.lines > 0


def real_filters():
    return sorted(f[:-5] for f in os.listdir(FILTER_DIR)
                  if f.endswith(".conf") and not f.endswith("common.conf"))


def _is_address(text):
    try:
        ipaddress.ip_address(str(text).strip("[]"))
        return True
    except ValueError:
        return False


def _same_address(found, expected):
    expected = ipaddress.ip_address(str(expected).strip("[]"))
    if expected.version == 6 and expected.ipv4_mapped is not None:
        expected = expected.ipv4_mapped
    return found == expected


def _expected_time(text):
    for fmt in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S.%f"):
        try:
            parsed = datetime.datetime.strptime(text, fmt)
            return time.mktime(parsed.timetuple())
        except ValueError:
            continue
    return None


def run_filter(name, check_time=True):
    """Run one filter over its sample file(s); a Result with every disagreement."""
    from policyd.errors import InputError
    from policyd.logs.fail2ban.engine import load
    from policyd.logs.filters import Failure

    os.environ["TZ"] = SAMPLE_TZ
    time.tzset()
    result = Result(name)
    cache = {}

    def get_filter(options):
        key = json.dumps(options, sort_keys=True)
        if key not in cache:
            cache[key] = load(name, options=options, clock=lambda: SAMPLE_NOW)
        return cache[key]

    files = [name]
    common = {}
    index = 0
    try:
        describe(result, get_filter({}).definition.failregex)
        active = None
        while index < len(files):
            path = os.path.join(SAMPLE_DIR, files[index])
            index += 1
            with open(path, encoding="utf-8", errors="replace") as stream:
                lines = stream.read().split("\n")
            skip_block = False
            position = 0
            while position < len(lines):
                line = lines[position]
                position += 1
                directive = _DIRECTIVE.match(line)
                if directive:
                    kind, data = directive.group(1), json.loads(directive.group(2))
                    if kind == "fileOptions":
                        common = data
                        continue
                    if kind == "filterOptions":
                        active, skip_block = [], False
                        for options in (data if isinstance(data, list) else [data]):
                            options = {**common, **options}
                            condition = options.get("test.condition")
                            if condition and not eval(condition, {"name": name, "opts": options}):
                                skip_block = True
                                continue
                            given = {k: v for k, v in options.items() if not k.startswith("test.")}
                            active.append((get_filter(given), options))
                        continue
                    if kind == "addFILE":
                        files.append(data)
                        continue
                    expected = data
                    if position >= len(lines):
                        break
                    line = lines[position]
                    position += 1
                elif skip_block or line.startswith("#") or not line.strip():
                    continue
                else:
                    expected = {}
                if skip_block:
                    continue
                if active is None:
                    active = [(get_filter({}), {})]
                line = line.rstrip("\r\n")
                for log_filter, options in active:
                    constraint = expected.get("constraint")
                    if constraint and not eval(constraint, {"name": name, "opts": options}):
                        continue
                    result.lines += 1
                    _check(result, log_filter, options, line, expected, check_time, Failure)
    except InputError as error:
        result.refused = str(error)
    return result


_HOST_TAG = re.compile(r"<(?:HOST|ADDR|IP4|IP6|SUBNET|F-ID)>|<F-(?:ID|IP4|IP6|ADDR)>")
_FREE_TEXT = re.compile(r"\.[*+]|<F-USER>|<F-ALT_USER>|\\S[*+]|\[\^[^\]]*\][*+]")


def describe(result, failregexes):
    """How much of a line an attacker may shape before the address (from the regexes)."""
    result.anchored = all(r.startswith("^") for r in failregexes)
    for regex in failregexes:
        host = _HOST_TAG.search(regex)
        if host and _FREE_TEXT.search(regex[:host.start()]):
            result.free_text_before_host = True


def _check(result, log_filter, options, line, expected, check_time, failure_type):
    if options.get("logtype") == "journal":
        outcome, when = log_filter.classify_text(options.get("test.prefix-line", "") + line,
                                                 when=float(SAMPLE_NOW))
    else:
        outcome, when = log_filter.classify_text(line)
    matched = isinstance(outcome, failure_type)
    want = bool(expected.get("match", False))
    host = expected.get("host")
    if want and host is not None and not _is_address(host):
        # fail2ban would resolve this name; policyd never bans by DNS name.
        result.names_skipped += 1
        if matched:
            result.problems.append(f"matched a DNS-name line: {line[:120]}")
        else:
            result.agree += 1
        return
    if matched != want:
        result.problems.append(f"{'missed' if want else 'false match'}: {line[:160]}")
        return
    if matched and host is not None and not _same_address(outcome.host, host):
        result.problems.append(f"host {outcome.host} != {host}: {line[:120]}")
        return
    if matched and check_time and expected.get("time") and options.get("logtype") != "journal":
        wanted = _expected_time(expected["time"])
        if when is None or wanted is None or abs(when - wanted) > 1:
            result.problems.append(f"time {when} != {expected['time']}: {line[:120]}")
            return
    result.agree += 1


def table(results):
    rows = ["| filter | sample lines | agree | DNS-name lines | result | anchored "
            "| free text before address |",
            "|---|---:|---:|---:|---|---|---|"]
    for r in results:
        if r.refused:
            verdict = f"refused: {r.refused.split(': ')[-1][:90]}"
        elif r.ok:
            verdict = "agrees on every line"
        else:
            verdict = f"{len(r.problems)} line(s) differ"
        shape = ("-", "-") if r.refused else (
            "yes" if r.anchored else "NO", "yes" if r.free_text_before_host else "no")
        rows.append(f"| {r.name} | {r.lines} | {r.agree} | {r.names_skipped} | {verdict} "
                    f"| {shape[0]} | {shape[1]} |")
    agreeing = sum(r.ok for r in results)
    rows.append(f"\n{agreeing} of {len(results)} filters agree on every line.")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    chosen = sys.argv[1:] or real_filters()
    results = [run_filter(name) for name in chosen]
    if "-v" in os.environ.get("CORPUS_VERBOSE", "-v"):
        for r in results:
            for problem in r.problems[:5]:
                print(f"# {r.name}: {problem}", file=sys.stderr)
            if r.refused:
                print(f"# {r.name}: {r.refused}", file=sys.stderr)
    print(table(results))
