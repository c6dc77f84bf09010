"""The ban policy the namespace tests write: a service open to anyone, Ollama on
loopback beside it if asked, and bans that read the given logs.

One text instead of a YAML template per test file; a test that needs another
shape (UDP services, lists, interfaces) still writes its own.
"""


def log_file(path, log_filter="nginx-auth"):
    """A `bans.logs` entry for a log file."""
    return f"    - path: {path}\n      filter: {log_filter}\n"


def journal(unit, directory, log_filter):
    """A `bans.logs` entry for a journal unit in its own journal directory."""
    return f"    - journal: {unit}\n      journal_dir: {directory}\n      filter: {log_filter}\n"


def ban_policy(*logs, ports=(8080,), service="proxy", ollama=False, maxretry=3,
               findtime="10m", bantime="1h"):
    """Policy text: `service` on `ports` allows any source; with ollama=True, Ollama
    on 11434 allows loopback only. Bans guard every port and read `logs`."""
    services = ""
    if ollama:
        services += '  ollama:\n    ports: [11434]\n    allow: [127.0.0.0/8, "::1"]\n'
    services += f"  {service}:\n    ports: [{_ports(ports)}]\n    allow: [any]\n"
    guarded = [*ports, *([11434] if ollama else [])]
    return (f"version: 1\nservices:\n{services}"
            f"bans:\n  ports: [{_ports(guarded)}]\n  maxretry: {maxretry}\n"
            f"  findtime: {findtime}\n  bantime: {bantime}\n  logs:\n" + "".join(logs))


def _ports(ports):
    return ", ".join(str(port) for port in ports)
