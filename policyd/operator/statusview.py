"""`policyd status`: what the daemon answers, or what the state dir and the
kernel say when none runs, printed as lines an operator reads.
"""
import time

from policyd.operator.cli_common import format_time, policystore


def without_daemon(obj):
    """The status JSON without a daemon: the policy and trial from the state dir, the
    kernel's features, and the bans the state file records (`"source": "state"`):
    counting the kernel's elements means a dump that takes the kernel ~0.3 s per
    100k bans, where the file counts them in milliseconds."""
    from policyd.kernel import trialstate
    from policyd.operator import banstate
    store = policystore.PolicyStore(obj.state_dir)
    nft = obj.nft_or_none()
    policy = trialstate.status(store, nft=nft)
    result = {"daemon": None, "policy": policy, "bans": None, "logs": [], "fleet": None}
    if policy["committed"] is not None:
        active = banstate.count_in_state(obj.state_dir, time.time())
        result["bans"] = {"active": active or 0, "total": None, "source": "state"}
    if nft is not None:
        result["kernel"] = nft.features()
    return result


def _policy_lines(policy):
    committed, held_back = policy["committed"], policy.get("held_back")
    if committed:
        when = committed["committed_at"]
        return [f"policy:    {committed['source'] or '?'} (sha256 {(committed['sha256'] or '?')[:12]}, "
                f"committed {'?' if when is None else format_time(when)})"]
    if not held_back:
        return ["policy:    nothing committed"]
    return [f"policy:    NOT ENFORCED: {held_back['source']} was not loaded: {held_back['reason']}",
            "           nothing is guarded and nobody is banned until you fix it and "
            "`policyd apply --confirm-timeout 120`"]


def _trial_line(policy):
    pending, ended = policy["trial"], policy.get("ended_trial")
    if pending:
        return (f"trial:     {pending['source']} (sha256 {pending['candidate_sha256'][:12]}), "
                f"{pending['seconds_left']}s left; policyd confirm | policyd rollback")
    if ended:
        return (f"trial:     none; the trial of {ended['source']} ended unconfirmed at "
                f"{format_time(ended['deadline'])} and the committed policy is back")
    return "trial:     none"


def _bans_line(bans):
    total = f", {bans['total']} since start" if bans.get("total") is not None else ""
    source = (" (as the state file records them; no daemon runs to ask)"
              if bans.get("source") == "state" else "")
    return f"bans:      {bans['active']} active{total}{source}"


def to_text(result):
    lines = []
    daemon = result.get("daemon")
    lines.append(f"daemon:    running, pid {daemon['pid']}, up {daemon['uptime']}s"
                 if daemon else "daemon:    not running")
    for problem in (daemon or {}).get("problems", []):
        lines.append(f"problem:   {problem} (still enforcing what the kernel holds)")
    lines += _policy_lines(result["policy"])
    lines.append(_trial_line(result["policy"]))
    if result.get("bans"):
        lines.append(_bans_line(result["bans"]))
    kernel = result.get("kernel")
    if kernel:
        reload = f", reload {kernel['reload']}" if kernel.get("reload") else ""   # daemons before it
        lines.append(f"kernel:    {kernel['kernel']}, re-ban by {kernel['reban']}{reload}")
    for entry in result.get("logs", []):
        state = "ok" if entry.get("exists") and not entry.get("error") else (
            f"NOT FOLLOWED: {entry['error']}" if entry.get("error") else "missing")
        lines.append(f"log:       {entry['path']} [{entry['filter']}] {state}, "
                     f"{entry['lines']} lines, {entry['matched']} failures, "
                     f"{entry['malformed']} malformed, {entry['rotations']} rotations")
    if result.get("fleet"):
        from policyd.fleet.node import status_line
        lines.append(status_line(result["fleet"]))
    for entry in result.get("lists", []):
        state = f"refused: {entry['error']}" if entry.get("error") else "ok"
        lines.append(f"list:      {entry['path']} {entry['entries']} entries, {state}")
    return "\n".join(lines)
