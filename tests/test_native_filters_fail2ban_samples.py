"""fail2ban's own annotated samples as an oracle (issue 10, point 3): for
nginx-http-auth, traefik-auth and haproxy-http-auth in fail2ban's default mode,
policyd's filters agree with every `# failJSON:` annotation, match or not and
the host. The samples are read from the installed fail2ban at test time (GPL:
never copied into this repository)."""
import ipaddress
import json
from pathlib import Path

import pytest

from policyd.logs.filters import Failure, load_filter

SAMPLES = Path("/usr/lib/python3/dist-packages/fail2ban/tests/files/logs")
# fail2ban sample -> (policyd filter, fail2ban's default mode or None if it has none)
CORPUS = {
    "nginx-http-auth": ("nginx-auth", "normal"),
    "traefik-auth": ("traefik-auth", "normal"),
    "haproxy-http-auth": ("haproxy-auth", None),
}


def annotated(path, default_mode):
    """(line number, expectation, line) for every annotated line fail2ban tests in its default mode."""
    cases, expectation, active = [], None, True
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        text = raw.decode("utf-8", "replace")
        if text.startswith("# filterOptions:"):
            options = json.loads(text.split(":", 1)[1])
            if isinstance(options, dict):
                options = [options]
            active = any(o.get("mode", default_mode) == default_mode for o in options)
        elif text.startswith("# failJSON:"):
            expectation = json.loads(text.split(":", 1)[1])
        elif text.startswith("#") or not text.strip():
            continue
        elif expectation is not None:
            if active:
                cases.append((number, expectation, raw))
            expectation = None
    return cases


def _plain(address):
    return address.ipv4_mapped if address.version == 6 and address.ipv4_mapped else address


@pytest.mark.parametrize("sample", sorted(CORPUS))
def test_policyd_agrees_with_every_fail2ban_annotation(sample):
    path = SAMPLES / sample
    if not path.is_file():
        pytest.skip(f"fail2ban's samples are not installed ({path}); `apt-get install fail2ban`")
    name, mode = CORPUS[sample]
    log_filter = load_filter(name)
    cases = annotated(path, mode)
    assert cases, f"no annotated line in {path} for mode {mode}"
    matches = 0
    for number, expected, line in cases:
        outcome = log_filter.classify(line)
        where = f"{path}:{number}: {line[:140]!r} -> {outcome}"
        if expected.get("match"):
            matches += 1
            assert isinstance(outcome, Failure), where
            assert _plain(outcome.host) == _plain(ipaddress.ip_address(expected["host"])), where
            assert outcome.time is not None, where
        else:
            assert not isinstance(outcome, Failure), where
    assert matches, f"{path} holds no matching line for mode {mode}"
