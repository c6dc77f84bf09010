"""Turns the benchmark results into one markdown table, target by target.

Owns the targets of SPEC.md "Targets" as numbers, the met/missed verdicts, and
the machine description printed with every table. Measures nothing itself.
"""
import os
import platform
import statistics
import subprocess
import time

MET, MISSED, INFO = "met", "**missed**", ""


def machine():
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "nproc": os.cpu_count(),
            "cpu": model, "kernel": platform.release(), "python": platform.python_version(),
            "nginx": _version(["nginx", "-v"]), "fail2ban": _version(["fail2ban-server", "-V"])}


def _version(command):
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].replace("nginx version: ", "") if text else "unknown"


def _ms(latency):
    text = f"median {latency['median_ms']:.1f} ms, p99 {latency['p99_ms']:.1f} ms ({latency['trials']} trials)"
    if latency.get("from_request_median_ms") is not None:
        text += (f"; from the request: {latency['from_request_median_ms']:.1f} / "
                 f"{latency['from_request_p99_ms']:.1f} ms")
    if latency.get("responses_dropped"):
        text += f"; {latency['responses_dropped']} banned before the 401 left"
    return text


def _verdict(ok):
    return MET if ok else MISSED


def _one_cpu(throughput):
    one = throughput.get("policyd_one_cpu")
    return f"; on one CPU {one['wall_seconds']:.2f} s ({throughput['ratio_wall_one_cpu']}x)" if one else ""


def rows(results):
    """[(measurement, policyd, fail2ban, target, verdict)] for whatever `results` holds."""
    out = []
    f2b = results.get("fail2ban") or {}
    if "throughput" in results:
        t = results["throughput"]
        out.append((f"(a) filter throughput, nginx error.log, {t['lines']:,} lines ({t['matched']:,} failures)",
                    f"{t['policyd']['wall_seconds']:.2f} s wall ({t['policyd_lines_per_second']:,} lines/s; "
                    f"scan {t['policyd']['scan_seconds']:.3f} s)" + _one_cpu(t),
                    f"{t['fail2ban']['wall_seconds']:.2f} s wall ({t['fail2ban_lines_per_second']:,} lines/s; "
                    f"scan {t['fail2ban']['scan_seconds']:.2f} s)",
                    f">= 30x fail2ban-regex: {t['ratio_wall']}x wall, {t['ratio_scan']}x scan",
                    _verdict(t["ratio_wall"] >= 30)))
    for t in results.get("throughput_mixes", []):
        mix = f"{t['failures'] * 100:g}% failures" if t["failures"] else "no candidate lines"
        out.append((f"(a) filter throughput, {mix}, {t['lines']:,} lines ({t['matched']:,} failures)",
                    f"{t['policyd']['wall_seconds']:.2f} s wall, start-up included (scan "
                    f"{t['policyd']['scan_seconds']:.3f} s)" + _one_cpu(t),
                    f"{t['fail2ban']['wall_seconds']:.2f} s wall (scan {t['fail2ban']['scan_seconds']:.2f} s)",
                    f">= 30x fail2ban-regex: {t['ratio_wall']}x wall", _verdict(t["ratio_wall"] >= 30)))
    for key, label in (("latency", "(b) ban latency, real nginx, IPv4"),
                       ("latency_allowlist", "(b) ban latency, with a {n:,}-network allowlist")):
        if key in results:
            lat = results[key]
            f2b_cell = _ms(f2b["latency"]) if key == "latency" and "latency" in f2b else ""
            ok = lat["median_ms"] <= 10 and lat["p99_ms"] <= 50 and not lat["misses"]
            out.append((label.format(n=lat.get("allowlist", 0)), _ms(lat) + _misses(lat), f2b_cell,
                        "median <= 10 ms, p99 <= 50 ms", _verdict(ok)))
    for restore in results.get("restore", []):
        out += _restore_rows(restore, f2b.get("restore"))
    if "apply" in results:
        out += _apply_rows(results["apply"])
    out += _flood_rows(results.get("flood"), results.get("fail2ban_flood"))
    reload = results.get("reload_latency")
    if reload:
        busy, quiet = reload["during_reloads"], reload["quiet"]
        churn = reload.get("list_churn_lines")
        what = f", each after {churn:,} lines of the list file changed" if churn else ""
        out.append((f"(g) ban latency during a loop of {reload['allowlist']:,}-network reloads{what}",
                    f"median {busy['median_ms']:.1f} ms, p99 {busy['p99_ms']:.1f} ms ({busy['trials']} trials "
                    f"over {reload['reloads']} reloads, {_seconds_spread(reload['reload_seconds'])}); "
                    f"without reloads: {quiet['median_ms']:.1f} / {quiet['p99_ms']:.1f} ms", "",
                    "p99 <= 50 ms", _verdict(busy["p99_ms"] <= 50 and not busy["misses"])))
    if "cli" in results:
        out += _cli_rows(results["cli"])
    memory = results.get("memory")
    if memory:
        out.append(("(e) daemon RSS, idle", f"{memory['rss_idle_mb']:.1f} MB", "", "<= 40 MB",
                    _verdict(memory["rss_idle_mb"] <= 40)))
        out.append((f"(e) daemon RSS, {memory['bans']:,} bans",
                    f"{memory['rss_bans_mb']:.1f} MB (peak {memory['peak_rss_bans_mb']:.1f} MB)", "",
                    "<= 150 MB", _verdict(memory["rss_bans_mb"] <= 150)))
    if "fleet" in results:
        out.append(_fleet_row(results["fleet"]))
    return out


def _fleet_row(fleet):
    floor = fleet["redis_floor"]
    ok = (fleet["median_ms"] <= 20 and fleet["p99_ms"] <= 100 and fleet["max_ms"] <= 1000
          and not fleet["misses"])
    poll_ms = fleet["crowdsec_poll_seconds"] * 1000
    return (f"(f) fleet: ban on n1's kernel -> all {fleet['nodes']} kernels, over Redis",
            f"median {fleet['median_ms']:.1f} ms, p99 {fleet['p99_ms']:.1f} ms, max {fleet['max_ms']:.0f} ms "
            f"({fleet['trials']} trials{_misses(fleet)}; a node's RSS {fleet.get('rss_mb_last_node')} MB); "
            f"bare XADD->XREAD here: median "
            f"{floor['median_ms']:.1f} ms, p99 {floor['p99_ms']:.1f} ms",
            f"CrowdSec bouncer polls every {fleet['crowdsec_poll_seconds']:.0f} s (not run; mean wait "
            f"~{poll_ms / 2:.0f} ms = {poll_ms / 2 / max(fleet['median_ms'], 0.01):.0f}x policyd's median)",
            "median <= 20 ms, p99 <= 100 ms, max <= 1 s", _verdict(ok))


def _seconds_spread(values):
    if not values:
        return "none completed"
    return f"each {statistics.median(values):.2f} s median, {max(values):.2f} s at most"


def _flood_runs(flood):
    """', median of N runs (all: ...; CPU ...)' when the flood was run more than once."""
    runs = flood.get("runs") or []
    if len(runs) < 2:
        return ""

    def seconds(key):
        return " / ".join("-" if run[key] is None else f"{run[key]:.2f}" for run in runs)
    return (f", median of {len(runs)} runs (all: {seconds('all_banned_seconds')} s; "
            f"the daemon's CPU until then: {seconds('all_banned_cpu_seconds')} s)")


def _flood_rows(flood, fail2ban):
    if not flood:
        return []
    lat = flood["latency"]
    banned = flood["all_banned_seconds"]
    f2b = ""
    if fail2ban and "kernel_bans" in fail2ban:
        f2b = (f"{fail2ban['kernel_bans']:,} of {flood['sources']:,} banned after {fail2ban['seconds']:.0f} s "
               f"(stopped there; {fail2ban.get('total_failed') or 0:,} failures counted)")
    elif fail2ban:
        f2b = fail2ban.get("error", "")
    return [
        (f"(f) flood: {flood['lines']:,} failure lines from {flood['sources']:,} sources written at once",
         ("never all banned" if banned is None else f"all banned {banned:.2f} s after the write")
         + _flood_runs(flood) + f" ({flood['kernel_bans']:,} in the kernel)", f2b, "<= 3 s",
         _verdict(banned is not None and banned <= 3 and flood["kernel_bans"] >= flood["sources"])),
        ("(f) ban latency of new attackers during the flood (another log)",
         f"median {lat['median_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms ({lat['trials']} trials)", "",
         "p99 <= 50 ms", _verdict(lat["trials"] > 0 and lat["p99_ms"] <= 50 and not lat["misses"])),
        ("(e) daemon RSS during and right after the flood",
         f"{flood['rss_max_during_mb']:.1f} MB at most, {flood['rss_after_mb']:.1f} MB after "
         f"(idle {flood['rss_idle_mb']:.1f} MB)"
         + (f"; its lookahead child: {flood['child_rss_max_mb']:.1f} MB RSS at most, of which "
            f"{flood['child_pss_max_mb']:.1f} MB its own share (PSS)" if flood.get("child_rss_max_mb") else ""),
         "", "<= 150 MB",
         # The child's own share counts too (the most of each, added: never less than at any moment).
         _verdict(max(flood["rss_max_during_mb"], flood["rss_after_mb"]) + flood.get("child_pss_max_mb", 0) <= 150)),
    ]


def _samples(a, key):
    """'x / y / z' of a key's samples in seconds."""
    return " / ".join(f"{seconds:.2f}" for seconds in a[key.replace("_seconds", "_samples")])


def _apply_rows(a):
    n = a["networks"]
    first, again = a["first_apply_seconds"], a["reapply_seconds"]
    rounds = "rounds" in a   # before rounds: one sample of each
    row = (f"(d) apply {n:,} networks from a list file (half IPv4 /28, half IPv6 /64), "
           "first / re-apply", f"{first:.2f} s / {again:.2f} s"
           + (f", median of {a['rounds']} rounds taking turns with `nft -f` (first: "
              f"{_samples(a, 'first_apply_seconds')} s; re-apply: {_samples(a, 'reapply_seconds')} s)"
              if rounds else ""))
    if "nft_f_first_seconds" not in a:  # a result from before the reference was measured
        return [row + ("", "<= 1.5 s and faster than `nft -f`", _verdict(max(first, again) <= 1.5))]
    nft_first, nft_again = a["nft_f_first_seconds"], a["nft_f_again_seconds"]
    out = [row + (f"`nft -f` of the same ruleset: {nft_first:.2f} s / {nft_again:.2f} s "
                  f"({first / nft_first:.2f}x / {again / nft_again:.2f}x)"
                  + (f" (first: {_samples(a, 'nft_f_first_seconds')} s; again: "
                     f"{_samples(a, 'nft_f_again_seconds')} s)" if rounds else ""),
                  "<= 1.5 s and faster than `nft -f`",
                  _verdict(max(first, again) <= 1.5 and first < nft_first and again < nft_again))]
    out.append((f"(d) apply the same {n:,} networks from YAML, first / re-apply",
                f"{a['yaml_first_seconds']:.2f} s / {a['yaml_reapply_seconds']:.2f} s", "",
                "<= 2.5 s", _verdict(max(a["yaml_first_seconds"], a["yaml_reapply_seconds"]) <= 2.5)))
    churns = a.get("churn_samples") or [a["churn_seconds"]]
    out.append((f"(d) list file change, {a['churn_lines']:,} lines of {n:,} (1% churn), "
                "under the daemon: write -> in the kernel",
                f"{a['churn_seconds'] * 1000:.0f} ms"
                + (f", median of {len(churns)} changes (all: "
                   + " / ".join(f"{seconds * 1000:.0f}" for seconds in churns) + " ms)"
                   if len(churns) > 1 else ""), "", "<= 100 ms",
                _verdict(a["churn_seconds"] <= 0.1)))
    return out


def _cli_rows(c):
    what = f"{c['networks']:,} networks and {c['bans']:,} bans"

    def cell(value):
        return f"{value:.2f} s" if isinstance(value, (int, float)) else str(value)

    def ok(value, limit):
        return isinstance(value, (int, float)) and value <= limit

    daemon, alone = c["with_daemon"], c.get("without_daemon", {})
    out = [(f"(f) `doctor` with {what}", cell(daemon["doctor"]), "", "<= 1 s",
            _verdict(ok(daemon["doctor"], 1.0)))]
    for command in ("status", "bans", "explain"):
        text = f"daemon running {cell(daemon[command])}"
        if command == "bans" and "bans_after_a_ban" in daemon:
            text += f" (right after a new ban: {cell(daemon['bans_after_a_ban'])})"
        if command == "explain":
            text += f" (a banned source: {cell(daemon['explain_banned'])})"
        if command in alone:
            text += f"; no daemon {cell(alone[command])}"
        if command == "bans" and "bans_reading_the_rows" in alone:
            text += f" (no listing file to reuse, the rows read: {cell(alone['bans_reading_the_rows'])})"
        # The listing without a daemon is judged as an operator meets it after a
        # stop (the file the daemon left); the rows read again are shown beside.
        values = ([daemon[command]] + ([daemon["explain_banned"]] if command == "explain" else [])
                  + ([daemon["bans_after_a_ban"]] if command == "bans" and "bans_after_a_ban" in daemon else [])
                  + ([alone[command]] if command in alone else []))
        out.append((f"(f) `{command}` with {what}", text, "", "<= 0.2 s",
                    _verdict(all(ok(v, 0.2) for v in values))))
    stall = c.get("ban_latency")
    if stall:
        during, quiet = stall["during_bans"], stall["alone"]
        out.append((f"(f) ban latency while `policyd bans` lists {c['bans']:,} bans in a loop",
                    f"p99 {during['p99_ms']:.0f} ms, max {during['max_ms']:.0f} ms "
                    f"({stall['bans_runs']} runs)",
                    f"nothing else running: p99 {quiet['p99_ms']:.0f} ms", "p99 <= 50 ms",
                    _verdict(during["p99_ms"] <= 50)))
    return out


def _misses(latency):
    return f", {latency['misses']} missed" if latency["misses"] else ""


def _restore_cell(scenario):
    seconds = scenario["restore_seconds"]
    when = "never back" if seconds is None else f"{seconds:.2f} s"
    gap = ("none unenforced" if scenario["max_sample_missing"] == 0
           else "all unenforced until then")
    return f"{when}, {scenario['lost']} lost, {gap}"


def _restore_ok(scenario, must_stay_enforced):
    seconds = scenario["restore_seconds"]
    return (seconds is not None and seconds <= 2 and scenario["lost"] == 0
            and (scenario["max_sample_missing"] == 0 or not must_stay_enforced))


def _restore_rows(restore, fail2ban):
    n = restore["bans"]
    f2b_cell = ""
    if fail2ban and fail2ban.get("bans") == n:
        seconds = fail2ban.get("unenforced_window_seconds")
        f2b_cell = (f"{seconds:.1f} s from the stop (server ready {fail2ban['server_ready_seconds']:.1f} s), "
                    f"{fail2ban['still_unenforced_at_limit']} lost, up to {fail2ban['max_unenforced']:,} unenforced"
                    if seconds is not None else
                    f"not complete: {fail2ban['still_unenforced_at_limit']:,} still unenforced at the limit")
    elif fail2ban:
        per_ban = fail2ban["unenforced_window_seconds"] / fail2ban["bans"] if fail2ban.get(
            "unenforced_window_seconds") else None
        f2b_cell = (f"not run (~{per_ban * n / 60:.0f} min at its {fail2ban['bans']:,}-ban rate)"
                    if per_ban else "not run")
    restart = restore["restart"]
    return [
        (f"(c) restart with {n:,} bans (systemctl restart)",
         _restore_cell(restart) + f"; ready in {restart['daemon_ready_seconds']:.2f} s", f2b_cell,
         "<= 2 s, 0 lost, never unenforced", _verdict(_restore_ok(restart, True))),
        (f"(c) cold start with {n:,} bans (tables gone, e.g. reboot)",
         _restore_cell(restore["cold_start"]), "", "<= 2 s, 0 lost",
         _verdict(_restore_ok(restore["cold_start"], False))),
        (f"(c) `nft flush ruleset` under the daemon, {n:,} bans",
         _restore_cell(restore["flush"]), "", "<= 2 s, 0 lost",
         _verdict(_restore_ok(restore["flush"], False))),
    ]


def markdown(results, info):
    lines = [f"Measured {info['date']} on {info['nproc']} x {info['cpu']}, Linux {info['kernel']}, "
             f"Python {info['python']}, {info['nginx']}, fail2ban {info['fail2ban']}.", "",
             "| measurement | policyd | fail2ban | target | |", "|---|---|---|---|---|"]
    for row in rows(results):
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines) + "\n"


def missed(results):
    return [row[0] for row in rows(results) if row[4] == MISSED]
