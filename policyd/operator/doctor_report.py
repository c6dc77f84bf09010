"""What `policyd doctor` reports: the Finding every check returns, and the text and
JSON output with its exit code. Knows no check; policyd.operator.doctor runs them.

JSON form (`policyd doctor --json`), stable:
    {"ok": bool,            # true when every finding is "ok"
     "findings": [{"level": "ok" | "warn" | "fail",
                   "check": "listener" | "interface" | "log" | "filter" | "table" |
                            "drift" | "trial" | "committed" | "nftables-service" |
                            "daemon" | "policy-file" | "fleet",
                   "message": str,   # what was found, one line
                   "fix": str}]}     # what to do about it; "" for "ok"
Text form: one line per finding, "LEVEL CHECK: MESSAGE" plus "; fix: FIX" for
warn and fail. Exit code 0 when all is ok, 1 when anything is warn or fail.
"""
import json
from dataclasses import asdict, dataclass

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Finding:
    level: str
    check: str
    message: str
    fix: str = ""


def ok(check, message):
    return Finding(OK, check, message)


def warn(check, message, fix):
    return Finding(WARN, check, message, fix)


def fail(check, message, fix):
    return Finding(FAIL, check, message, fix)


def all_ok(findings):
    return all(f.level == OK for f in findings)


def exit_code(findings):
    return 0 if all_ok(findings) else 1


def to_json(findings):
    return json.dumps({"ok": all_ok(findings), "findings": [asdict(f) for f in findings]})


def to_text(findings):
    lines = []
    for f in findings:
        line = f"{f.level:<4} {f.check}: {f.message}"
        if f.fix:
            line += f"; fix: {f.fix}"
        lines.append(line)
    return "\n".join(lines)
