"""A bounded flood through the real daemon in a namespace: every source banned in
the kernel, a newcomer in another log banned as well, and the daemon still
answering. Sizes are small and waits generous: no timing is asserted here
(bench/flood.py measures the 300k-line flood)."""
import ipaddress
import json
import sqlite3
from pathlib import Path

from policyd_lab.netlab import PolicydDaemon, wait_for
from policyd_lab.nginxlog import nginx_failure
from policyd_lab.policies import ban_policy, log_file

SOURCES = 3000


def source(i):
    return f"2001:db8:{0x8000 + (i >> 16):x}:{i & 0xFFFF:x}::7"


def elements(host, set_name):
    out = host.nft("-j", "list", "set", "inet", "policyd_bans", set_name, check=False)
    if out.returncode != 0:
        return set()
    for item in json.loads(out.stdout)["nftables"]:
        if "set" in item:
            return {_value(elem) for elem in item["set"].get("elem", [])}
    return set()


def _rows(path, table):
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        db.close()


def _value(elem):
    """An element as nft -j writes it: a string, {"elem": {"val": ...}}, or a prefix."""
    if isinstance(elem, dict) and "elem" in elem:
        elem = elem["elem"]["val"]
    if isinstance(elem, dict) and "prefix" in elem:
        elem = elem["prefix"]["addr"]
    return elem


def _start(world):
    """The daemon following two empty logs: (flood log, other log, daemon)."""
    flood, other = world.lab.tmp / "flood.log", world.lab.tmp / "other.log"
    flood.write_text("")
    other.write_text("")
    daemon = PolicydDaemon(world.server, world.policy(ban_policy(log_file(flood), log_file(other))))
    return flood, other, daemon.start()


def test_a_flood_of_sources_is_banned_every_one_and_a_newcomer_too(world):
    flood, other, daemon = _start(world)
    try:
        # Three rounds, so no source reaches maxretry before the last third of the file.
        flood.write_text("".join(nginx_failure(source(n % SOURCES), connection=n) for n in range(3 * SOURCES)))
        other.write_text(nginx_failure("198.51.100.77") * 3)
        assert wait_for(lambda: len(elements(world.server, "ban6")) >= SOURCES, timeout=120,
                        interval=0.5), f"{len(elements(world.server, 'ban6'))} of {SOURCES} banned"
        assert wait_for(lambda: "198.51.100.77" in elements(world.server, "ban4"), timeout=30)
        banned = {ipaddress.ip_address(value) for value in elements(world.server, "ban6")}
        assert banned == {ipaddress.ip_network(f"{source(i)}/64", strict=False).network_address
                          for i in range(SOURCES)}
        status = json.loads(world.server.policyd("status", "--json").stdout)
        assert status["bans"]["active"] == SOURCES + 1
        # State waits while the backlog is read (the kernel first), then holds every
        # ban and its history, with the daemon still running.
        state_db = Path(world.lab.policyd_env(world.server)["POLICYD_STATE_DIR"]) / "state.db"
        assert wait_for(lambda: _rows(state_db, "bans") == _rows(state_db, "ban_history") == SOURCES + 1,
                        timeout=60, interval=0.5), (_rows(state_db, "bans"), _rows(state_db, "ban_history"))
        [flood_stats] = [entry for entry in status["logs"] if entry["path"] == str(flood)]
        assert flood_stats["matched"] == 3 * SOURCES
    finally:
        err = daemon.stop_and_read()
    # A flood is logged as summaries, not one journal line per ban.
    assert err.count(" ban addr=") < 100
    assert "bans count=" in err


def test_a_control_reload_is_answered_once_the_worker_has_it_in_use(world):
    from policyd.operator import control
    flood, other, daemon = _start(world)
    try:
        run_dir = world.lab.policyd_env(world.server)["POLICYD_RUN_DIR"]
        digest = json.loads(world.server.policyd("status", "--json").stdout)["policy"]["committed"]["sha256"]
        assert control.request(run_dir, "reload", timeout=60) == {"sha256": digest}
        # Bans still work after the policy was taken again on the worker.
        other.write_text(nginx_failure("198.51.100.78") * 3)
        assert wait_for(lambda: "198.51.100.78" in elements(world.server, "ban4"), timeout=30)
    finally:
        err = daemon.stop_and_read()
    assert "reloaded " in err and "failed" not in err
