"""A table replaced whole, loaded in place: the kernel keeps the sets and chains it has.

Owns rewriting a document that replaces a table (`add table; delete table; add
table ...`, as policyd.rules.compile writes it) into one transaction that keeps
the table, and the sets and chains the document names again: their rules and
elements are flushed and loaded anew, and whatever the document no longer has
is deleted. Linux 6.18 was seen to miss lookups in an interval set made in the
transaction that makes its rules live (an allowed client's packet dropped in
about one swap in 40); a set that exists before the transaction is searchable
throughout it. The kernel checks that a kept set or base chain is what the
document defines: it refuses the transaction otherwise, and the caller loads
the document as written.
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
    """`document` with each table it replaces that the kernel has updated in place
    instead, or None if the kernel has none of them.

    existing: {table: (chain names, set names)} as the kernel has them now.
    """
    replaced = set(replaced_tables(document))
    present = {name: objects for name, objects in existing.items()
               if name in replaced and (objects[0] or objects[1])}
    if not present:
        return None
    commands = []
    for command in document["nftables"]:
        (verb, body), = command.items()
        table = body.get("table", {}).get("name") if verb == "delete" else None
        if table in present:
            commands += _keeping(document, table, *present[table])
        else:
            commands.append(command)
    return {"nftables": commands}


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
