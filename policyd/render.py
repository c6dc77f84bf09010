"""Render a compiled document as nft syntax, for `policyd show` and `nft -f`.

Covers exactly the expressions compile.py emits; anything else is a bug in
one of the two and raises instead of printing something misleading.
"""


def to_text(document):
    """The ruleset `document` leaves behind, in `nft list ruleset` layout.

    Loadable with `nft -f` into an empty ruleset. The transaction's replace
    and flush steps are implied: each table is shown as it will be afterwards.
    """
    tables = {}
    for command in document["nftables"]:
        (verb, body), = command.items()
        if verb in ("metainfo", "delete", "flush"):
            continue
        (kind, obj), = body.items()
        if kind == "table":
            tables.setdefault((obj["family"], obj["name"]), {"sets": {}, "chains": {}})
            continue
        table = tables[(obj["family"], obj["table"])]
        if kind == "set":
            table["sets"][obj["name"]] = dict(obj, elem=list(obj.get("elem", [])))
        elif kind == "element":
            table["sets"][obj["name"]]["elem"] += obj["elem"]
        elif kind == "chain":
            table["chains"][obj["name"]] = (obj, [])
        elif kind == "rule":
            table["chains"][obj["chain"]][1].append(obj["expr"])
        else:
            raise ValueError(f"cannot render {verb} {kind}")
    lines = []
    for (family, name), table in tables.items():
        lines.append(f"table {family} {name} {{")
        for set_name, obj in table["sets"].items():
            lines.append(f"\tset {set_name} {{")
            lines += ["\t\t" + part for part in _set_body(obj)]
            lines.append("\t}")
        for chain_name, (obj, rules) in table["chains"].items():
            lines.append(f"\tchain {chain_name} {{")
            if "hook" in obj:
                lines.append(f"\t\ttype {obj['type']} hook {obj['hook']} priority "
                             f"{obj['prio']}; policy {obj['policy']};")
            lines += ["\t\t" + " ".join(_stmt(e) for e in exprs) for exprs in rules]
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
