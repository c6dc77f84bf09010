"""A daemon catching up on a log written while it was down judges failures by the
time each line carries (issue 10, point 4): failures an hour apart ban nobody,
a burst within findtime still bans, and a first-seen log is not read at all.
"""
import json
import time

from policyd_lab.netlab import PolicydDaemon, wait_for
from policyd_lab.nginxlog import nginx_failure
from policyd_lab.policies import ban_policy, log_file
from policyd_lab.world import SERVER_WAN_V4, STRANGER_V4


def failure(address, ago):
    return nginx_failure(address, time.time() - ago)


def _status(world):
    return json.loads(world.server.policyd("status", "--json").stdout)["logs"][0]


def test_catching_up_bans_by_the_time_each_line_carries(world):
    log = world.lab.tmp / "error.log"
    # A first-seen log is followed from its end: this burst is history.
    log.write_text(failure(STRANGER_V4, 30) * 5)
    world.server.listen(8080)
    policy = world.policy(ban_policy(log_file(log)))
    daemon = PolicydDaemon(world.server, policy).start()
    try:
        time.sleep(0.5)
        assert _status(world)["matched"] == 0
        assert world.stranger.can_connect(SERVER_WAN_V4, 8080, 1.0)
    finally:
        daemon.stop_and_read()
    # Down for three hours, as the log tells it: one failure an hour.
    with log.open("a") as out:
        for hours in (3, 2, 1):
            out.write(failure(STRANGER_V4, hours * 3600))
    daemon = PolicydDaemon(world.server, policy).start()
    try:
        assert wait_for(lambda: _status(world)["matched"] == 3, 5)
        time.sleep(0.3)
        assert world.stranger.can_connect(SERVER_WAN_V4, 8080, 1.0), "banned for failures hours apart"
        # A burst five minutes ago, read now: three failures within findtime.
        with log.open("a") as out:
            for seconds in (302, 301, 300):
                out.write(failure(STRANGER_V4, seconds))
        assert wait_for(lambda: not world.stranger.can_connect(SERVER_WAN_V4, 8080, 0.2), 5)
    finally:
        err = daemon.stop_and_read()
    assert f"ban addr={STRANGER_V4}/32 filter=nginx-auth failures=3" in err
