"""The error model: every error meant for the operator is a PolicydError, one
line (`file:line: key: what`) carrying the exit code SPEC gives it (1 the
operation ran and said no, 2 the input is wrong). The CLI prints it; nothing else.
"""

EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2


class PolicydError(Exception):
    """An error the operator reads as one line and the CLI turns into its exit code."""

    exit_code = EXIT_REFUSED
    headline = ""  # said before the place and the message, e.g. "the kernel refused: "

    def __init__(self, message="", file=None, line=None, key=None):
        super().__init__(message)
        self.message = str(message)
        self.file = file
        self.line = line
        self.key = key

    def __str__(self):
        where = []
        if self.file:
            where.append(str(self.file) + (f":{self.line}" if self.line else ""))
        if self.key:
            where.append(str(self.key))
        return ": ".join(where + [self.message])

    def for_operator(self) -> str:
        return self.headline + str(self)


class InputError(PolicydError):
    """What the operator wrote is wrong: a policy, a filter, an argument, an option."""

    exit_code = EXIT_BAD_INPUT


class HostError(PolicydError):
    """The host is not as policyd needs it, through no fault of the input: a damaged
    or foreign state database, a control socket another daemon holds, a file it
    cannot create. The operator fixes the host, not the command line."""


class Refused(PolicydError):
    """The operation ran and said no (a trial step too late, a lockout risk)."""


class KernelError(PolicydError):
    """nftables refused a transaction; the ruleset is unchanged."""

    headline = "the kernel refused: "
