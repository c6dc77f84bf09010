"""Errors that reach the operator as one line: file, line, key, what is wrong.

Every module raises InputError for bad operator input so the CLI can print it
and exit 2 without a traceback; KernelError is a refusal from nftables.
"""


class InputError(Exception):
    """Bad input from the operator: a policy, a filter, an argument."""

    def __init__(self, message, file=None, line=None, key=None):
        super().__init__(message)
        self.message = message
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


class KernelError(Exception):
    """nftables refused a transaction; the ruleset is unchanged."""
