"""What doctor compares of one of policyd's tables: its shape (base chains' hooks,
each chain's verdicts in order, each set's type, flags and elements), from the
ruleset model or from the kernel's listing, and the differences of two in words.
"""
import hashlib
import ipaddress
import json

VERDICTS = ("accept", "drop", "reject", "goto", "jump", "return", "continue", "queue")


def table_shape(objects):
    """What doctor compares: base chains' hooks, each chain's verdicts in order, and
    each set's type, flags and (unless entries time out by themselves) elements.

    Rule matches are left out on purpose: the kernel lists them normalised
    (implicit protocol matches dropped, anonymous sets sorted), so comparing them
    would report drift that is not there.
    """
    chains, rules, sets = {}, {}, {}
    for obj in objects:
        if "chain" in obj:
            c = obj["chain"]
            chains[c["name"]] = tuple(c.get(k) for k in ("type", "hook", "prio", "policy"))
            rules.setdefault(c["name"], [])
        elif "rule" in obj:
            r = obj["rule"]
            rules.setdefault(r["chain"], []).append(_verdict(r.get("expr", [])))
        elif "set" in obj:
            s = obj["set"]
            flags = s.get("flags", [])
            flags = frozenset([flags] if isinstance(flags, str) else flags)
            elements = None
            if "timeout" not in flags:
                elements = _elements_shape(s.get("elem", []), s.get("type"))
            sets[s["name"]] = (s.get("type"), flags, elements)
    return {"chains": chains, "rules": rules, "sets": sets}


class _Dumped:
    """An interval set's elements compared as the kernel's dump of them: a hash of
    bytes, not 100k texts. texts() is for saying what differs."""

    def __init__(self, digest, texts):
        self.digest = digest
        self.texts = texts

    def __eq__(self, other):
        return isinstance(other, _Dumped) and self.digest == other.digest

    def __hash__(self):
        return hash(self.digest)


def _elements_shape(elements, typename):
    intervals = getattr(elements, "intervals", None)  # compiled: lists.Elements
    if intervals is not None and typename in ("ipv4_addr", "ipv6_addr"):
        from policyd.kernel.drift import dump_form
        length = 4 if typename == "ipv4_addr" else 16
        return _Dumped(hashlib.sha256(dump_form(intervals, length)).hexdigest(),
                       lambda: frozenset(_element(e) for e in elements.json()))
    if hasattr(elements, "raw"):  # listed over netlink: nllist.KernelElements
        return _Dumped(hashlib.sha256(elements.raw).hexdigest(),
                       lambda: frozenset(_element(e) for e in elements.texts()))
    return frozenset(_element(e) for e in elements)


def _texts(elements):
    return elements.texts() if isinstance(elements, _Dumped) else elements


def _verdict(exprs):
    for expr in reversed(exprs):
        for kind in VERDICTS:
            if kind in expr:
                target = expr[kind].get("target") if isinstance(expr[kind], dict) else None
                return f"{kind} {target}" if target else kind
    return "no verdict"


def _element(raw):
    """One set element as cheap comparable text ("addr/len", "addr" or JSON).

    Python and the kernel spell almost every address alike, so text compares
    100k elements in milliseconds; _same_networks() settles what text cannot.
    """
    if isinstance(raw, dict) and "elem" in raw:
        raw = raw["elem"].get("val")
    if isinstance(raw, dict) and isinstance(raw.get("prefix"), dict):
        return f'{raw["prefix"].get("addr")}/{raw["prefix"].get("len")}'
    if isinstance(raw, str):
        return raw
    return json.dumps(raw, sort_keys=True)


def _networks(elements):
    """Elements that spell networks, as ipaddress networks; anything else as it is."""
    out = set()
    for text in elements:
        try:
            if text.startswith('{"range"'):
                low, high = (ipaddress.ip_address(x) for x in json.loads(text)["range"])
                out.add(tuple(ipaddress.summarize_address_range(low, high)))
            else:
                out.add(ipaddress.ip_network(text))
        except (ValueError, TypeError, KeyError):
            out.add(text)
    return out


def _element_differences(want, have):
    """(elements only the kernel has, elements only the policy has), compared as
    networks where their text differs (the kernel writes ::ffff:192.0.2.1 where
    Python writes ::ffff:c000:201)."""
    extra, lacking = _networks(have - want), _networks(want - have)
    return extra - lacking, lacking - extra


def compare_shapes(expected, loaded):
    """Differences between two table_shape()s, as short phrases; [] if none."""
    out = []
    for name in sorted(expected["chains"].keys() - loaded["chains"].keys()):
        out.append(f"chain {name} is missing")
    for name in sorted(loaded["chains"].keys() - expected["chains"].keys()):
        out.append(f"chain {name} is not in the policy")
    for name in sorted(expected["chains"].keys() & loaded["chains"].keys()):
        if expected["chains"][name] != loaded["chains"][name]:
            out.append(f"chain {name} has a different hook, priority or policy")
        want, have = expected["rules"].get(name, []), loaded["rules"].get(name, [])
        if want != have:
            out.append(f"chain {name} has {len(have)} rules ending in "
                       f"[{', '.join(have)}], expected {len(want)} [{', '.join(want)}]")
    for name in sorted(expected["sets"].keys() - loaded["sets"].keys()):
        out.append(f"set {name} is missing")
    for name in sorted(loaded["sets"].keys() - expected["sets"].keys()):
        out.append(f"set {name} is not in the policy")
    for name in sorted(expected["sets"].keys() & loaded["sets"].keys()):
        (want_type, want_flags, want), (have_type, have_flags, have) = (
            expected["sets"][name], loaded["sets"][name])
        if (want_type, want_flags) != (have_type, have_flags):
            out.append(f"set {name} has a different type or flags")
        elif want is not None and want != have:
            extra, lacking = _element_differences(_texts(want), _texts(have))
            if not extra and not lacking:
                continue
            parts = []
            if extra:
                parts.append(f"{len(extra)} element(s) not in the policy "
                             f"({_sample(extra)})")
            if lacking:
                parts.append(f"{len(lacking)} element(s) missing ({_sample(lacking)})")
            out.append(f"set {name}: " + ", ".join(parts))
    return out


def _sample(elements, count=3):
    shown = sorted(str(e) for e in elements)
    return ", ".join(shown[:count]) + (", ..." if len(shown) > count else "")


# --- the host's services ---------------------------------------------------
