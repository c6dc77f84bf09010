"""Commands that make many short-lived, acyclic objects (compiling 100k
networks, listing 100k bans) run with Python's cyclic garbage collector paused:
walking those objects over and over finds nothing and cost ~15% of an apply's
CPU with 100k networks.
"""
import functools
import gc


def collector_paused(command):
    """`command` runs with the collector paused; it is as it was afterwards (the
    tests run commands in one process, and an embedding caller may too)."""
    @functools.wraps(command)
    def paused(*args, **kwargs):
        enabled = gc.isenabled()
        gc.disable()
        try:
            return command(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()
    return paused
