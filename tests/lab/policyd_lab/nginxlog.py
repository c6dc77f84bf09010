"""nginx auth_basic failure lines as nginx writes them to error.log.

The tests write these lines themselves when they want every byte under their
control; test_ban_nginx gets the same lines from a real nginx.
"""
import time

STAMP = "%Y/%m/%d %H:%M:%S"


def nginx_failure(client, when=None, *, user="admin", connection=1, pid=1234, path="/api/tags",
                  server="_", host="ollama.example", end="\n"):
    """A `password mismatch` line for `client`. `when`: None for now (the failure
    window runs on a line's own time), seconds since the epoch, or a stamp as is."""
    if when is None:
        when = time.time()
    stamp = when if isinstance(when, str) else time.strftime(STAMP, time.localtime(when))
    return (f'{stamp} [error] {pid}#{pid}: *{connection} user "{user}": password mismatch, '
            f'client: {client}, server: {server}, request: "GET {path} HTTP/1.1", '
            f'host: "{host}"{end}')
