"""A table replaced whole, loaded in place: the kernel keeps the sets and chains it has.

Owns rewriting a document that replaces a table (`add table; delete table; add
table ...`, as policyd.rules.compile writes it) into one transaction that keeps
the table, and the sets and chains the document names again: their rules and
elements are flushed and loaded anew, and whatever the document no longer has
is deleted. Linux 6.18 was seen to miss lookups in an interval set made in the
transaction that makes its rules live (an allowed client's packet dropped in
about one swap in 40); a set that exists before the transaction is searchable
throughout it; so an interval set the table lacks is made, empty and named
by no rule, in a transaction before. The kernel checks that a kept set or base
chain is what the document defines: it refuses the transaction otherwise, and
the caller loads the document as written. Which kernels get this is
policyd.kernel.nft's (loads_in_place): Debian 12's 6.1 misses lookups while a
set's ranges are replaced in place, not in a new set.
"""
from policyd.rules.model import FAMILY


def replaced_tables(document):
    """Names of the tables `document` deletes and then adds again (a table it
    only deletes, as when a policy renames its table, stays deleted)."""
    deleted, replaced = set(), []
    for command in document["nftables"]:
        (verb, body), = command.items()
        name = body["table"]["name"] if "table" in body else None
        if verb == "delete" and name is not None:
            deleted.add(name)
        elif verb == "add" and name in deleted and name not in replaced:
            replaced.append(name)
    return replaced


def in_place(document, existing):
    """(first, update) for each table `document` replaces that the kernel has, or
    None if the kernel has none of them.

    existing: {table: (chain names, set names)} as the kernel has them now.
    first: a transaction to commit before `update`, or None: the interval sets
    `update` needs that the kernel lacks, made empty (a set no rule names yet
    changes no packet's fate; by `update` it exists, and is searchable).
    update: `document` with those tables updated in place instead of replaced.
    """
    replaced = set(replaced_tables(document))
    present = {name: objects for name, objects in existing.items()
               if name in replaced and (objects[0] or objects[1])}
    if not present:
        return None
    made = _made_first(document, present)
    commands = []
    for command in document["nftables"]:
        (verb, body), = command.items()
        table = body.get("table", {}).get("name") if verb == "delete" else None
        if table in present:   # (a set made first is empty: nothing to flush)
            commands += _keeping(document, table, *present[table])
        else:
            commands.append(command)
    return ({"nftables": made} if made else None), {"nftables": commands}


def _made_first(document, present):
    """`add set` commands, without elements, for the interval sets `document` adds
    to a table in `present` ({table: (chains, sets)}) that the table lacks."""
    made = []
    for command in document["nftables"]:
        (verb, body), = command.items()
        if verb != "add" or "set" not in body:
            continue
        declared = body["set"]
        if (declared["table"] in present and declared["name"] not in present[declared["table"]][1]
                and "interval" in _flags(declared)):
            made.append({"add": {"set": {key: value for key, value in declared.items() if key != "elem"}}})
    return made


def unmade(first):
    """The transaction that deletes the sets `first` made."""
    return {"nftables": [{"delete": {"set": {key: command["add"]["set"][key]
                                            for key in ("family", "table", "name")}}}
                         for command in first["nftables"]]}


def _flags(obj):
    flags = obj.get("flags", [])
    return [flags] if isinstance(flags, str) else flags


def _keeping(document, table, chains, sets):
    """The commands that empty `table` for the document's own commands to fill it
    again, keeping what they add again under the same name."""
    added = {kind: {body[kind]["name"] for command in document["nftables"]
                    for verb, body in command.items()
                    if verb == "add" and kind in body and body[kind].get("table") == table}
             for kind in ("chain", "set")}

    def command(verb, kind, name):
        return {verb: {kind: {"family": FAMILY, "table": table, "name": name}}}
    # Rules go first: a set or chain can be deleted once no rule names it.
    return ([command("flush", "chain", name) for name in sorted(chains)]
            + [command("flush" if name in added["set"] else "delete", "set", name)
               for name in sorted(sets)]
            + [command("delete", "chain", name) for name in sorted(chains)
               if name not in added["chain"]])
