"""The ban log: one line per ban for a few, a summary per second in a flood."""
import ipaddress
import logging

from fakes import FakeClock
from policyd.banning.banlog import BanLog
from policyd.banning.bans import NewBans

NOW = 1_000_000.0


def new_bans(first, count):
    return NewBans([((4, int(ipaddress.ip_address("192.0.2.0")) + first + n, 32),
                     (NOW + 3600, 3, "nginx-auth", "auto", NOW)) for n in range(count)])


def test_a_few_bans_a_line_each_a_flood_one_summary_per_second(caplog):
    clock = FakeClock(0.0)
    ban_log = BanLog(clock)
    with caplog.at_level(logging.WARNING, logger="policyd"):
        ban_log.record(new_bans(0, 2))
        assert [r.getMessage() for r in caplog.records] == [
            "ban addr=192.0.2.0/32 filter=nginx-auth failures=3 duration=3600s",
            "ban addr=192.0.2.1/32 filter=nginx-auth failures=3 duration=3600s"]
        caplog.clear()
        ban_log.record(new_bans(10, 30))
        ban_log.record(new_bans(40, 5))   # part of the flood now: into the summary
        ban_log.flush(due_only=True)
        assert caplog.records == []
        clock.advance(1.0)
        ban_log.record(new_bans(50, 40))
        ban_log.record(new_bans(90, 40))
        ban_log.flush()
    assert [r.getMessage() for r in caplog.records] == [
        "bans count=75 filter=nginx-auth sample=\"192.0.2.10/32 192.0.2.11/32 192.0.2.12/32 "
        "192.0.2.13/32 192.0.2.14/32\" hint=\"policyd bans lists them all\"",
        "bans count=40 filter=nginx-auth sample=\"192.0.2.90/32 192.0.2.91/32 192.0.2.92/32 "
        "192.0.2.93/32 192.0.2.94/32\" hint=\"policyd bans lists them all\""]
