"""What `check` and `apply` prove about a policy beyond the file itself.

Owns the checks of what the daemon will meet when it takes the policy: every
filter in bans.logs loads and every log path can be followed. A mistake here is
an InputError naming the policy file, line and key, so an operator learns of a
typo at `check`, not from a daemon that skips that log.
"""
import os
import stat

from policyd.errors import InputError


def check_log_sources(policy, filter_dirs=None):
    """Raise InputError for the first bans.logs entry the daemon could not follow
    (fail2ban filters are loaded with their mode, and for a journal source as one)."""
    from policyd.logs.filters import load_filter  # the regex machinery only where it is needed
    for index, source in enumerate(policy.bans.logs):
        try:
            load_filter(source.filter, filter_dirs, mode=source.mode, journal=bool(source.journal))
        except InputError as exc:
            # A filter file's own error keeps its file:line; a name lookup's is the message.
            detail = str(exc) if exc.file else exc.message
            raise InputError(f"filter {source.filter!r} does not load: {detail}", policy.source,
                             source.filter_line, f"bans.logs[{index}].filter") from None
        problem = source.path and log_path_problem(source.path)
        if problem is not None:
            raise InputError(f"{source.path!r} {problem}", policy.source, source.path_line,
                             f"bans.logs[{index}].path")


def log_path_problem(path):
    """Why `path` can never be followed as a log, or None.

    A log that does not exist yet is fine (the daemon waits for it); one whose
    permissions hide it from this user is left to `doctor`, which runs as root.
    """
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return "cannot exist: a part of its directory is a file"
    except PermissionError:
        return None
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISDIR(status.st_mode):
        return "is a directory, not a log file"
    if not stat.S_ISREG(status.st_mode):
        return "is not a regular file (a FIFO, socket or device cannot be followed)"
    return None
