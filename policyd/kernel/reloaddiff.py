"""A reload as a transaction of only the element differences: when a policy's
chains, rules and set declarations are what the kernel has (its `frame`), the
guard table's interval sets change by the elements that came and went, in one
transaction, instead of the whole table (100k elements) going out and in again.
"""
from policyd import pieces
from policyd.kernel import drift, nlbatch
from policyd.rules.elements import Elements


def frame(ruleset, table):
    """The ruleset's commands with the interval elements of `table`'s sets left out."""
    out = []
    for command in ruleset.commands:
        body = command.get("add", {}).get("set")
        if body is not None and body.get("table") == table and isinstance(body.get("elem"), Elements):
            out.append({"add": {"set": {k: v for k, v in body.items() if k != "elem"}}})
        else:
            out.append(command)
    return out


def element_changes(ruleset, table, held):
    """{set name: (key length, intervals out, intervals in)} that take `table`'s
    interval sets from `held` ({name: (key length, intervals)}: what the kernel
    holds) to `ruleset`'s; None where a difference cannot be sent as elements."""
    changes = {}
    for name, item in ruleset.tables[table].sets.items():
        if not isinstance(item.elem, Elements):
            continue
        wanted = item.elem.intervals
        if wanted is None or name not in held:
            return None
        length, have = held[name]
        # In pieces (policyd.pieces): a set of 100k intervals made in one pass
        # holds the GIL for 20-50 ms, and bans wait behind it.
        if have is wanted or pieces.equal(have, wanted):
            continue
        have_set, wanted_set = pieces.to_set(have), pieces.to_set(wanted)
        remove = pieces.sort(list(pieces.without(have, wanted_set)))
        add = pieces.sort(list(pieces.without(wanted, have_set)))
        # nft's leading end element at 0 exists only while no interval starts at 0.
        if any(first == 0 for first, _ in remove) or any(first == 0 for first, _ in add):
            return None
        changes[name] = (length, remove, add)
    return changes


def encode_changes(table, changes):
    """One batch: per set, the intervals that go out, then those that come in."""
    encoder = nlbatch.Encoder()
    for name, (length, remove, add) in changes.items():
        for kind, intervals in ((nlbatch.DELSETELEM, remove), (nlbatch.NEWSETELEM, add)):
            if intervals:
                elements = nlbatch.interval_elements(intervals, length, lead=False)
                encoder._chunked(kind, table, name, elements,
                                 nlbatch.NLM_F_CREATE if kind == nlbatch.NEWSETELEM else 0)
    return encoder.messages


def kernel_holds(netlink, table, name, length, intervals):
    """Whether the kernel's set holds exactly `intervals`: its dump hashed against
    the dump they make (policyd.kernel.drift.dump_form), no parse of 200k elements."""
    return (b"".join(netlink.set_element_payloads(table, name))
            == drift.dump_form(intervals, length))


def delta(netlink, new, old, table, held):
    """The batch that takes the kernel from `old` (a Ruleset, the kernel's as far
    as the daemon knows, with `held` its interval sets) to `new`: [] when nothing
    differs, None when only a whole load will do (the frame changed, a set empties
    or appears, or the kernel does not hold what `held` says)."""
    if frame(new, table) != frame(old, table):
        return None
    changes = element_changes(new, table, held)
    if changes is None:
        return None
    for name, (length, remove, add) in changes.items():
        if not kernel_holds(netlink, table, name, length, held[name][1]):
            return None
    return encode_changes(table, changes)
