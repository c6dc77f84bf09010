"""policyd.logs.filtercache: test-filter's parsed filters, kept by content and trusted only when safe."""
import os
from pathlib import Path

import pytest

from policyd.logs import filtercache
from policyd.logs.filterfile import DEFAULT_SEARCH_DIRS, load_filter

BUNDLED = sorted(p.stem for p in Path(DEFAULT_SEARCH_DIRS[0]).glob("*.yaml"))


def shape(log_filter):
    """Everything matching reads, as comparable data."""
    def pattern(p):
        return (p.pattern, p.flags) if hasattr(p, "pattern") else p
    rules = []
    for rule in log_filter.rules:
        fields = {k: v for k, v in vars(rule).items() if k != "time_parser"}
        fields = {k: (pattern(v) if hasattr(v, "pattern") else
                      [(a, pattern(b)) for a, b in v] if k == "match_regex" else v) for k, v in fields.items()}
        fields["time_format"] = rule.time_parser.format if rule.time_parser else None
        rules.append((type(rule).__name__, fields))
    guard = {k: pattern(v) for k, v in (log_filter.guard or {}).items()}
    return (log_filter.name, rules, [pattern(p) for p in log_filter.ignore], guard,
            log_filter.prefilter, log_filter._ignore and [r for r, _ in log_filter._ignore])


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_filter_comes_back_from_the_cache_as_it_was_parsed(name, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    parsed = load_filter(name)
    assert shape(load_filter(name, cache=True)) == shape(parsed)   # parsed, then written
    assert len(os.listdir(filtercache.directory())) == 1
    monkeypatch.setattr("policyd.logs.filterfile._parse", lambda *a: pytest.fail("parsed again"))
    assert shape(load_filter(name, cache=True)) == shape(parsed)   # read back


def test_an_edited_filter_is_parsed_again(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "mine.yaml"
    text = (Path(DEFAULT_SEARCH_DIRS[0]) / "nginx-auth.yaml").read_text()
    path.write_text(text)
    assert load_filter(str(path), cache=True).ignore
    path.write_text(text.split("\nignore:")[0] + "\n" + text.split("\nguard:", 1)[1].join(["guard:", ""]))
    assert load_filter(str(path), cache=True).ignore == ()


def test_a_cache_others_can_write_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    parsed = load_filter("nginx-auth", cache=True)
    [entry] = Path(filtercache.directory()).iterdir()
    planted = entry.read_text().replace("password mismatch", "password MISmatch")
    entry.write_text(planted)   # what someone else could plant
    os.chmod(entry, 0o666)
    assert shape(load_filter("nginx-auth", cache=True)) == shape(parsed)
    entry.write_text(planted)
    os.chmod(entry, 0o644)
    os.chmod(filtercache.directory(), 0o777)
    assert shape(load_filter("nginx-auth", cache=True)) == shape(parsed)
    os.chmod(filtercache.directory(), 0o700)
    assert b"MISmatch" in load_filter("nginx-auth", cache=True).prefilter[0]   # trusted: read


def test_a_damaged_entry_is_parsed_again(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    parsed = load_filter("nginx-auth", cache=True)
    [entry] = Path(filtercache.directory()).iterdir()
    entry.write_text('{"rules": [')
    assert shape(load_filter("nginx-auth", cache=True)) == shape(parsed)
