"""Render the ruleset model as nft syntax, for `policyd show` and `nft -f`.

Covers exactly the expressions compile.py emits; anything else is a bug in
one of the two and raises instead of printing something misleading.
"""


def to_text(ruleset):
    """The tables a Ruleset (policyd.rules.model) leaves, in `nft list ruleset` layout.

    Loadable with `nft -f` into an empty ruleset. The transaction's replace
    and flush steps are implied: each table is shown as it will be afterwards.
    """
    lines = []
    for table in ruleset.tables.values():
        lines.append(f"table {table.family} {table.name} {{")
        for item in table.sets.values():
            lines.append(f"\tset {item.name} {{")
            lines += ["\t\t" + part for part in _set_body(dict(item.fields, elem=item.elem))]
            lines.append("\t}")
        for chain in table.chains.values():
            lines.append(f"\tchain {chain.name} {{")
            if chain.hook:
                fields = chain.fields
                lines.append(f"\t\ttype {fields['type']} hook {fields['hook']} priority "
                             f"{fields['prio']}; policy {fields['policy']};")
            lines += ["\t\t" + " ".join(_stmt(e) for e in rule.exprs) for rule in chain.rules]
            lines.append("\t}")
        lines.append("}")
    return "\n".join(lines) + "\n"


def _set_body(obj):
    parts = [f"type {obj['type']}"]
    if obj.get("flags"):
        parts.append(f"flags {','.join(obj['flags'])}")
    if "timeout" in obj:
        parts.append(f"timeout {obj['timeout']}s")
    if "size" in obj:
        parts.append(f"size {obj['size']}")
    if obj["elem"]:
        parts.append(f"elements = {{ {', '.join(_element(e) for e in obj['elem'])} }}")
    return parts


def _element(elem):
    if isinstance(elem, dict) and "elem" in elem:
        inner = elem["elem"]
        text = _value(inner["val"])
        if "timeout" in inner:
            text += f" timeout {inner['timeout']}s"
        return text
    return _value(elem)


def _value(value):
    if isinstance(value, dict):
        if "prefix" in value:
            return f"{value['prefix']['addr']}/{value['prefix']['len']}"
        if "set" in value:
            return "{ " + ", ".join(_value(v) for v in value["set"]) + " }"
        if "&" in value:
            left, right = value["&"]
            return f"{_expr(left)} & {right}"
        return _expr(value)
    return str(value)


def _expr(expr):
    if "payload" in expr:
        return f"{expr['payload']['protocol']} {expr['payload']['field']}"
    if "meta" in expr:
        return f"meta {expr['meta']['key']}"
    if "ct" in expr:
        ct = expr["ct"]
        return f"ct {ct['dir']} {ct['key']}" if "dir" in ct else f"ct {ct['key']}"
    if "&" in expr:
        left, right = expr["&"]
        return f"{_expr(left)} & {right}"
    raise ValueError(f"cannot render expression {expr!r}")


def _stmt(stmt):
    (kind, body), = stmt.items()
    if kind == "match":
        right = body["right"]
        left = _expr(body["left"])
        if isinstance(right, str) and not right.startswith("@") and left == "meta iifname":
            text = f'"{right}"'
        elif isinstance(right, dict) and "set" in right and left == "meta iifname":
            text = "{ " + ", ".join(f'"{v}"' for v in right["set"]) + " }"
        else:
            text = _value(right)
        op = "" if body["op"] in ("==", "in") else body["op"] + " "
        return f"{left} {op}{text}"
    if kind in ("accept", "drop"):
        return kind
    if kind == "goto":
        return f"goto {body['target']}"
    if kind == "reject":
        if body["type"] == "tcp reset":
            return "reject with tcp reset"
        return f"reject with {body['type']} {body['expr']}"
    if kind == "set":
        limit = body["stmt"][0]["limit"]
        over = "over " if limit.get("inv") else ""
        return (f"{body['op']} {body['set']} {{ {_expr(body['elem'])} limit rate {over}"
                f"{limit['rate']}/{limit['per']} burst {limit['burst']} packets }}")
    raise ValueError(f"cannot render statement {kind}")
