"""The ruleset model: one nftables transaction and the tables it leaves behind.

The compiler builds a Ruleset; everything else reads it: the JSON document
libnftables (or policyd.kernel.nlbatch) loads, `show`'s nft text, the skeleton the
daemon's drift check compares, doctor's listed objects, explain's walk
(policyd.rules.walk) and the fake kernel of the tests (Ruleset.replay).
"""
import copy
from dataclasses import dataclass, field

FAMILY = "inet"


@dataclass
class Rule:
    exprs: list
    # Who asked for this rule, in the operator's words: why(packet, element) -> str
    # (element: what a set lookup in the rule matched). Not part of the document.
    why: object = None


@dataclass
class Chain:
    name: str
    fields: dict                      # as the document adds it: type, hook, prio, policy
    rules: list = field(default_factory=list)
    why: object = None                # said when a packet falls off this chain's end

    @property
    def hook(self):
        return self.fields.get("hook")


@dataclass
class Set:
    name: str
    fields: dict                      # type, flags, timeout, size (elements apart)
    elem: list = field(default_factory=list)

    @property
    def flags(self):
        flags = self.fields.get("flags", [])
        return [flags] if isinstance(flags, str) else list(flags)


@dataclass
class Table:
    family: str
    name: str
    sets: dict = field(default_factory=dict)     # name -> Set, in creation order
    chains: dict = field(default_factory=dict)   # name -> Chain, in creation order

    def base_chains(self, hook):
        return [chain for chain in self.chains.values() if chain.hook == hook]


class Ruleset:
    """A transaction (`commands`, in order) and the tables it leaves (`tables`):
    each builder call appends its command and applies it, with the kernel's
    meaning (adding what exists keeps it; flush empties; delete removes)."""

    def __init__(self):
        self.commands = [{"metainfo": {"json_schema_version": 1}}]
        self.tables = {}  # name -> Table (family inet)
        self.strict = False

    # ---------------------------------------------------------------- building

    def add_table(self, name):
        return self._command("add", "table", {"family": FAMILY, "name": name})

    def delete_table(self, name):
        return self._command("delete", "table", {"family": FAMILY, "name": name})

    def add_set(self, table, name, **fields):
        return self._command("add", "set", {"family": FAMILY, "table": table, "name": name,
                                            **fields})

    def flush_set(self, table, name):
        return self._command("flush", "set", {"family": FAMILY, "table": table, "name": name})

    def add_elements(self, table, name, elem):
        return self._command("add", "element", {"family": FAMILY, "table": table, "name": name,
                                                "elem": elem})

    def delete_elements(self, table, name, elem):
        return self._command("delete", "element", {"family": FAMILY, "table": table,
                                                   "name": name, "elem": elem})

    def add_chain(self, table, name, why=None, **fields):
        self._command("add", "chain", {"family": FAMILY, "table": table, "name": name, **fields})
        if why is not None:
            self.tables[table].chains[name].why = why
        return self

    def flush_chain(self, table, name):
        return self._command("flush", "chain", {"family": FAMILY, "table": table, "name": name})

    def add_rule(self, table, chain, *exprs, why=None):
        self._command("add", "rule", {"family": FAMILY, "table": table, "chain": chain,
                                      "expr": list(exprs)})
        if why is not None:
            self.tables[table].chains[chain].rules[-1].why = why
        return self

    def _command(self, verb, kind, obj):
        self.commands.append({verb: {kind: obj}})
        self._apply(verb, kind, obj)
        return self

    # ---------------------------------------------------------------- reading

    def document(self):
        """The JSON document for libnftables (`nft -j -f`) and policyd.kernel.nlbatch."""
        return {"nftables": self.commands}

    @classmethod
    def replay(cls, document, onto=None, strict=False):
        """The model of a document built elsewhere. `onto`: the tables it runs on (a
        fake kernel's, the tests'); `strict`: deleting what is not there is an error,
        as in the kernel, instead of nothing this model knows."""
        ruleset = cls()
        ruleset.strict = strict
        if onto is not None:
            ruleset.tables = copy.deepcopy(onto.tables)
        ruleset.commands = list(document["nftables"])
        for command in ruleset.commands:
            (verb, body), = command.items()
            if verb != "metainfo":
                (kind, obj), = body.items()
                ruleset._apply(verb, kind, obj)
        return ruleset

    def skeleton(self, table):
        """What the kernel reports of `table` cheaply (policyd.kernel.nfnetlink's skeleton):
        chain names with their rule counts, and set names; enough to notice a table
        someone edited, without listing 100k set elements."""
        found = self.tables.get(table)
        if found is None:
            return frozenset(), frozenset()
        return (frozenset((name, len(chain.rules)) for name, chain in found.chains.items()),
                frozenset(found.sets))

    def listed_objects(self, table):
        """`table` as `nft -j list table` shows it: [{"set": ...}, {"chain": ...},
        {"rule": ...}] with the fields the document gave (doctor compares these)."""
        found = self.tables.get(table)
        if found is None:
            return []
        objects = []
        for item in found.sets.values():
            listed = {"family": found.family, "table": table, "name": item.name, **item.fields}
            if item.elem:
                listed["elem"] = item.elem
            objects.append({"set": listed})
        for chain in found.chains.values():
            objects.append({"chain": {"family": found.family, "table": table, "name": chain.name,
                                      **chain.fields}})
            objects += [{"rule": {"family": found.family, "table": table, "chain": chain.name,
                                  "expr": rule.exprs}} for rule in chain.rules]
        return objects

    # ---------------------------------------------------------------- the kernel's meaning

    def _apply(self, verb, kind, obj):
        if obj.get("family", FAMILY) != FAMILY:
            raise ValueError(f"policyd only builds {FAMILY} tables")
        if kind == "table":
            if verb == "add":
                self.tables.setdefault(obj["name"], Table(FAMILY, obj["name"]))
            elif verb == "delete":
                if self.tables.pop(obj["name"], None) is None and self.strict:
                    raise LookupError(f"no table {obj['name']} to delete")
            else:
                raise ValueError(f"cannot {verb} a table")
            return
        table = self.tables.get(obj["table"])
        if table is None and verb == "delete" and kind == "element" and not self.strict:
            return  # from a table the kernel has and this transaction does not make
        if table is None:
            raise LookupError(f"no table {obj['table']} for {verb} {kind} {obj.get('name')}")
        if kind == "set":
            self._set(table, verb, obj)
        elif kind == "element":
            target = table.sets.get(obj["name"])
            if target is None and verb == "delete" and not self.strict:
                return
            if target is None:
                raise LookupError(f"no set {obj['name']} in {table.name}")
            if verb == "add":
                target.elem = list(target.elem) + list(obj["elem"])
            elif verb == "delete":
                gone = {_element_key(e) for e in obj["elem"]}
                if self.strict and gone - {_element_key(e) for e in target.elem}:
                    raise LookupError(f"no such element in {obj['name']}")
                target.elem = [e for e in target.elem if _element_key(e) not in gone]
            else:
                raise ValueError(f"cannot {verb} elements")
        elif kind == "chain":
            fields = {k: v for k, v in obj.items() if k not in ("family", "table", "name")}
            if verb == "add":
                table.chains.setdefault(obj["name"], Chain(obj["name"], fields))
            elif verb == "flush":
                table.chains[obj["name"]].rules = []
            else:
                raise ValueError(f"cannot {verb} a chain")
        elif kind == "rule" and verb == "add":
            table.chains[obj["chain"]].rules.append(Rule(obj["expr"]))
        else:
            raise ValueError(f"cannot {verb} {kind}")

    @staticmethod
    def _set(table, verb, obj):
        if verb == "add":
            fields = {k: v for k, v in obj.items() if k not in ("family", "table", "name", "elem")}
            existing = table.sets.get(obj["name"])
            if existing is None:
                # Interval sets may carry a lazy list (policyd.policy.lists.Elements): kept as it is.
                elem = obj.get("elem")
                table.sets[obj["name"]] = Set(obj["name"], fields, elem if elem is not None else [])
            elif obj.get("elem"):
                existing.elem = list(existing.elem) + list(obj["elem"])
        elif verb == "flush":
            table.sets[obj["name"]].elem = []
        else:
            raise ValueError(f"cannot {verb} a set")


def _element_key(elem):
    if isinstance(elem, dict) and "elem" in elem:
        elem = elem["elem"]["val"]
    return repr(elem)
