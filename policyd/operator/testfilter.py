"""`policyd test-filter`: its work, and the lean start that runs it without the CLI.

The command is defined in policyd.operator.cli (arguments, help, errors); run() is its
body. quick() runs the same body for the plain forms of the command line
(`test-filter FILTER LOGFILE [--json] [--mode MODE]`) before click and the
other commands' modules are imported: start-up is most of a small scan's time.
Anything else (help, a mistake, global options) goes to policyd.operator.cli.
"""
import os
import sys


def run(filter_name, logfile, as_json, mode, echo):
    """Scan LOGFILE with FILTER and print the report with echo(text)."""
    import json

    from policyd.logs import filters
    log_filter = filters.load_filter(filter_name, mode=mode, cache=True)
    # Both CPUs for a big log: start-up is most of a small scan, the scan most of a big one.
    result = filters.scan(log_filter, logfile, workers=None).to_json()
    if as_json:
        echo(json.dumps(result, sort_keys=True))
        return
    echo(f"{result['file']}: {result['lines']} lines, {result['matched']} matched, "
         f"{result['ignored']} ignored, {result['malformed']} malformed, "
         f"{len(result['hosts'])} hosts, {result['seconds']:.3f}s "
         f"({result['lines_per_second']:.0f} lines/s)")
    for host, count in sorted(result["hosts"].items(), key=lambda kv: -kv[1])[:20]:
        echo(f"  {count:8d}  {host}")


def parse(argv):
    """(filter, logfile, as_json, mode) for a plain test-filter command line, else None
    (policyd.operator.cli parses it then, with its help and its error messages)."""
    if not argv or argv[0] != "test-filter":
        return None
    positional, as_json, mode = [], False, None
    args = iter(argv[1:])
    for arg in args:
        if arg == "--json":
            as_json = True
        elif arg == "--mode" or arg.startswith("--mode="):
            value = arg[7:] if arg.startswith("--mode=") else next(args, None)
            if value is None or mode is not None:
                return None
            mode = value
        elif arg.startswith("-") or len(positional) == 2:
            return None
        else:
            positional.append(arg)
    if len(positional) != 2 or os.path.isdir(positional[1]):
        return None
    return positional[0], positional[1], as_json, mode


def quick(argv):
    """Run a plain test-filter command line; False if policyd.operator.cli must parse it."""
    parsed = parse(argv)
    if parsed is None:
        return False
    from policyd.errors import PolicydError

    def echo(text):
        sys.stdout.write(text + "\n")
    try:
        run(*parsed, echo)
    except PolicydError as exc:
        sys.stdout.flush()
        sys.stderr.write(f"policyd: {exc.for_operator()}\n")
        sys.exit(exc.exit_code)
    sys.stdout.flush()
    return True
