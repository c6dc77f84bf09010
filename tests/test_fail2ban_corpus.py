"""fail2ban's annotated samples agree with policyd's reimplementation of its filters."""
import os
import time

import pytest

import fail2ban_corpus as corpus

pytestmark = pytest.mark.skipif(not os.path.isdir(corpus.SAMPLE_DIR),
                                reason="Debian's fail2ban (sample logs) is not installed")

# Filters that need fail2ban's multi-line window (maxlines > 1).
MULTI_LINE = {"ejabberd-auth", "guacamole", "mongodb-auth", "slapd"}


@pytest.fixture(scope="module")
def results():
    saved = os.environ.get("TZ")
    try:
        yield {name: corpus.run_filter(name) for name in corpus.real_filters()}
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()


def test_every_real_filter_of_debian_is_measured(results):
    assert len(results) == 89


def test_at_least_85_filters_agree_on_every_sample_line(results):
    agreeing = {name for name, r in results.items() if r.ok}
    assert len(agreeing) >= 85, {n: r.problems[:3] or r.refused for n, r in results.items()
                                 if not r.ok}


def test_sshd_agrees_in_every_mode_including_the_connection_cache(results):
    sshd = results["sshd"]
    assert sshd.ok, sshd.problems[:5]
    assert sshd.lines > 200


def test_multi_line_filters_agree_too(results):
    assert all(results[name].ok for name in MULTI_LINE), {
        name: results[name].problems[:3] or results[name].refused for name in MULTI_LINE}


def test_the_readme_table_is_current(results):
    readme = os.path.join(os.path.dirname(__file__), "..", "filters", "README.md")
    with open(readme, encoding="utf-8") as stream:
        text = stream.read()
    table = corpus.table([results[name] for name in sorted(results)])
    assert table in text, "regenerate with: python3 tests/fail2ban_corpus.py"
