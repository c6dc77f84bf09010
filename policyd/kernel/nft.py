"""The kernel adapter: the only module that imports `nftables`.

Loads compiled documents in one transaction (a raw netlink batch encoded by
policyd.kernel.nlbatch where it can, libnftables otherwise), dry-runs them, lists
what is loaded, and keeps ban elements in step. Ban element changes go over raw
nfnetlink (policyd.kernel.nfnetlink) because libnftables rebuilds its whole cache on
every command, which costs hundreds of ms once a large allowlist is loaded.
"""
import errno
import ipaddress
import json
import logging
import os
import threading

import nftables

from policyd.kernel import inplace, nfnetlink, nlbatch, reloaddiff
from policyd.policy import lists
from policyd.rules.compile import BAN_SETS, RANGE_BAN_SETS
from policyd.rules.model import FAMILY
from policyd.errors import KernelError

PROTOCOLS = {6: "tcp", 17: "udp"}
log = logging.getLogger(__name__)


class Nft:
    """One long-lived libnftables context, bound to the current network namespace."""

    # Loads begun plus loads ended, by any context of this process (the daemon's
    # worker loads on contexts of its own): odd while one runs, so policyd.kernel.drift
    # does not compare meanwhile.
    loads = 0
    _loads_lock = threading.Lock()

    def __init__(self):
        self._ctx = nftables.Nftables()
        self._ctx.set_handle_output(False)
        self.netlink = nfnetlink.Netlink()

    @classmethod
    def _count_load(cls):
        with cls._loads_lock:
            cls.loads += 1

    def close(self):
        """Free the libnftables context (and its cache) now, not at garbage collection."""
        self.netlink.close()
        self._ctx = None

    def _run(self, command):
        rc, out, err = self._ctx.cmd(command)
        if rc != 0:
            raise KernelError(_first_error(err) or f"nft failed: {command}")
        return out

    def load(self, document, bans=None):
        """Run `document` as one transaction; on refusal nothing changed.

        Sent as one raw netlink batch when policyd.kernel.nlbatch can encode it (seconds
        faster with large allowlists: no libnftables cache or interval work),
        by libnftables otherwise. A table the document replaces and the kernel
        has is updated in place if the kernel takes that (policyd.kernel.inplace).
        `bans` (BanElements) are added in the same batch; through libnftables
        they follow in a second one.
        """
        self._count_load()
        try:
            extra = []
            if bans is not None and bans.items:
                extra = BanTable(self, bans.table, bans.ipv6_prefix).add_messages(bans.items)
            if self._loaded_in_place(document, extra):
                return
            try:
                self.netlink.send_batch(nlbatch.encode(document) + extra)
                return
            except nlbatch.Unsupported:
                pass
            except OSError as exc:
                # The batch changed nothing. libnftables' dry run names what the
                # kernel refuses; if it accepts the document, the kernel refused
                # only our encoding of it (a kernel we were not tested on): load
                # it the slow way rather than not at all.
                self.check(document)
                log.warning("kernel refused the netlink encoding (%s); loading through "
                            "libnftables", os.strerror(exc.errno or errno.EINVAL))
            self._json(document, dry_run=False)
            if extra:
                self.netlink.send_batch(extra)
        finally:
            self._count_load()

    def _loaded_in_place(self, document, extra):
        """Load `document` (and the `extra` messages) with the tables it replaces that
        the kernel has updated in place (policyd.kernel.inplace); False, with the
        kernel as it was, if that cannot be done or this kernel is better off
        with the table replaced whole."""
        tables = inplace.replaced_tables(document) if loads_in_place() else []
        if not tables:
            return False
        try:
            existing = {}
            for table in tables:
                chains, sets = self.netlink.skeleton(table)
                existing[table] = ({name for name, _rules in chains}, set(sets))
            plan = inplace.in_place(document, existing)
            if plan is None:
                return False
            first, update = plan
            messages = nlbatch.encode(update) + extra
            made = nlbatch.encode(first) if first is not None else []
        except (OSError, nlbatch.Unsupported):
            return False
        sets_made = False
        try:
            if made:
                self.netlink.send_batch(made)
                sets_made = True
            self.netlink.send_batch(messages)
            return True
        except OSError as exc:
            # The refused batch changed nothing: a kept set or chain the document
            # defines otherwise, say. Replacing the table whole is what it asks for.
            log.info("table not updated in place (%s); replacing it whole", exc)
        if sets_made:   # the sets made for the update, which no rule names: gone again
            try:
                self.netlink.send_batch(nlbatch.encode(inplace.unmade(first)))
            except (OSError, nlbatch.Unsupported) as exc:
                log.warning("could not delete the sets made for an update in place: %s", exc)
        return False

    def load_changes(self, new, old, table, held):
        """Take the kernel from Ruleset `old` to `new` by one transaction of only
        the interval elements that differ in `table` (policyd.kernel.reloaddiff), or by
        none if nothing does; False when that cannot be done (the caller loads
        `new` whole). Refused, the transaction changed nothing."""
        self._count_load()
        try:
            messages = reloaddiff.delta(self.netlink, new, old, table, held)
            if messages is None:
                return False
            if messages:
                self.netlink.send_batch(messages)
            return True
        except (OSError, nlbatch.Unsupported) as exc:
            log.info("element changes not loaded, loading whole: %s", exc)
            return False
        finally:
            self._count_load()

    def check(self, document):
        """Prove `document` would load, without changing anything."""
        self._json(document, dry_run=True)

    def _json(self, document, dry_run):
        lists.materialize(document)  # element texts built before the bindings serialise
        old = self._ctx.set_dry_run(dry_run)
        json_before = self._ctx.set_json_output(True)  # what json_cmd() does, with _json_text
        try:
            rc, _out, err = self._ctx.cmd(_json_text(document))
        finally:
            self._ctx.set_dry_run(old)
            self._ctx.set_json_output(json_before)
        if rc != 0:
            raise KernelError(_first_error(err) or "nftables refused the transaction")

    def features(self):
        """What this kernel can do that policyd depends on, probed once (as firewalld
        does at start): the release, and whether DESTROYSETELEM exists (>= 6.3), which
        decides how a re-ban replaces an element's timeout."""
        destroy = self.netlink.has_destroy()
        return {"kernel": os.uname().release, "destroy_set_element": destroy,
                "reban": "destroy+add" if destroy else "add+delete+add",
                "reload": "in place" if loads_in_place() else "whole table"}

    def tables(self):
        """Names of the inet tables that exist (over netlink: cheap enough to poll)."""
        return sorted(self.netlink.table_names())

    def skeleton(self, table):
        """Chains with rule counts and set names of one table (see Ruleset.skeleton)."""
        return self.netlink.skeleton(table)

    def table_objects(self, table):
        """The JSON objects of one inet table, or [] if it does not exist."""
        if table not in self.tables():
            return []
        return self._json_list(f"list table {FAMILY} {table}")

    def set_elements(self, table, name):
        """Elements of one of policyd's sets: (value, None, seconds left or None), over
        netlink, so a large allowlist elsewhere costs nothing. KernelError if absent."""
        try:
            keys = self.netlink.set_keys(table, name)
        except OSError as exc:
            raise KernelError(f"{table} {name}: {exc.strerror}") from None
        return [(_key_text(key), None, None if left is None else round(left / 1000))
                for key, left in keys.items()]

    def _json_list(self, command):
        self._ctx.set_json_output(True)
        try:
            out = self._run(command)
        finally:
            self._ctx.set_json_output(False)
        return json.loads(out)["nftables"] if out else []


# How a reload swaps the guard table, by what each kernel was seen to do with an
# allowed client's packets during 300 swaps (plain `nft -f`, counted in the
# kernel). Linux 6.18 misses lookups in an interval set made in the transaction
# that makes its rules live (whole table: 8 drops), and not in a set updated in
# place (0). Debian 12's 6.1 misses lookups in a set whose elements are replaced
# by others of the same start in one transaction (in place with changed ranges:
# 1 drop in 150), and not in a new set (whole table: 0 in 450). Kernels between
# were not measured and keep the whole-table swap policyd always used.
IN_PLACE_FROM = (6, 18)


def loads_in_place(release=None):
    """Whether this kernel (release: `uname -r`) gets tables updated in place."""
    numbers = (os.uname().release if release is None else release).split("-")[0].split(".")
    try:
        return (int(numbers[0]), int(numbers[1])) >= IN_PLACE_FROM
    except (IndexError, ValueError):
        return False


class BanTable:
    """The ban sets of one ban table: add, remove and list bans (BanKernel).

    A ban is keyed (version, first address as int, prefix length). Single IPv4
    addresses and IPv6 networks of the policy's ipv6_prefix (what automatic bans
    make) go to the hash sets, the fast path; every other network goes to the
    interval sets as a range, so the kernel enforces exactly what was banned.
    """

    def __init__(self, nft, table, ipv6_prefix):
        self.nft = nft
        self.table = table
        self.ipv6_prefix = ipv6_prefix
        self._netlink = nft.netlink

    def add_bans(self, bans):
        """Add (network, timeout seconds) pairs in one transaction.

        An element that exists already is replaced, so its timeout is the new one
        (also on kernels without DESTROYSETELEM, see nfnetlink.Netlink.replace).
        Ranges go in a second transaction: the kernel refuses a range that
        overlaps one still counting down its last second, and that refusal must
        not hold back the single-address bans of the same flush.
        """
        if bans:
            changes = self._changes((_key(n), t) for n, t in bans)
            for part in _hash_then_ranges(changes):
                self._netlink.replace(self.table, part)

    def remove_bans(self, networks):
        if networks:
            self._netlink.delete(self.table, self._changes((_key(n), None) for n in networks))

    def replace_ban_keys(self, items):
        """add_bans by key: [((version, first address as int, prefix length), seconds)],
        existing elements take the new timeout. No ipaddress objects: a flood bans
        100k networks."""
        if items:
            for part in _hash_then_ranges(self._changes(items)):
                self._netlink.replace(self.table, part)

    def add_ban_keys(self, items, flush_ipv6=False):
        """Restore [((version, first address as int, prefix length), seconds)] in one batch.

        The bulk path for restores: no ipaddress objects, and elements already
        in the kernel keep counting down instead of being replaced. flush_ipv6
        empties both IPv6 sets first, in the same transaction: after ipv6_prefix
        changed, the hash set's elements mean other networks under the new mask.
        """
        flush = (BAN_SETS[6], RANGE_BAN_SETS[6]) if flush_ipv6 else ()
        self._netlink.add(self.table, self._changes(items), flush)

    def add_messages(self, items):
        """add_ban_keys' messages, for Nft.load to send within its batch."""
        return self._netlink.add_messages(self.table, self._changes(items))

    def _changes(self, items):
        """set name -> netlink items for (key, timeout) pairs.

        Works on integers: restoring 100k bans must not format and parse 100k strings.
        """
        fast4, fast6, range4, range6 = [], [], [], []
        for (version, number, prefixlen), timeout in items:
            if timeout is not None:
                timeout = max(1, int(timeout))
            if version == 4:
                if prefixlen == 32:
                    fast4.append((number.to_bytes(4, "big"), timeout))
                else:
                    range4.append(_interval(4, number, prefixlen, timeout))
            elif prefixlen == self.ipv6_prefix:
                fast6.append((number.to_bytes(16, "big"), timeout))
            else:
                range6.append(_interval(6, number, prefixlen, timeout))
        changes = {BAN_SETS[4]: fast4, BAN_SETS[6]: fast6,
                   RANGE_BAN_SETS[4]: range4, RANGE_BAN_SETS[6]: range6}
        return {name: items for name, items in changes.items() if items}

    def list_ban_keys(self):
        """{(version, first address as int, prefix length)} of the kernel's ban elements."""
        return set(self._elements())

    def list_bans(self):
        """network -> seconds left, as the kernel holds them ({} without the table)."""
        types = {4: ipaddress.IPv4Network, 6: ipaddress.IPv6Network}
        return {types[version]((number, prefix)): round((left or 0) / 1000)
                for (version, number, prefix), left in self._elements().items()}

    def _elements(self):
        """(version, first address as int, prefix length) -> ms left, over netlink."""
        found = {}
        for version in (4, 6):
            prefix = 32 if version == 4 else self.ipv6_prefix
            for key, left in self._dump(BAN_SETS[version]).items():
                found[(version, int.from_bytes(key, "big"), prefix)] = left
            for key, left in _ranges(version, self._dump(RANGE_BAN_SETS[version], flags=True)):
                found[key] = left
        return found

    def _dump(self, name, flags=False):
        try:
            if flags:
                return self._netlink.set_elements(self.table, name)
            return self._netlink.set_keys(self.table, name)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return [] if flags else {}  # the table is gone; the daemon restores it
            raise


def _hash_then_ranges(changes):
    """`changes` split in two: the hash sets' part, then the interval sets' part."""
    ranges = set(RANGE_BAN_SETS.values())
    parts = ({n: i for n, i in changes.items() if n not in ranges},
             {n: i for n, i in changes.items() if n in ranges})
    return [part for part in parts if part]


def _key(network):
    return (network.version, int(network.network_address), network.prefixlen)


def _interval(version, number, prefixlen, timeout):
    """(start, timeout, end) for nfnetlink: end is the first address after the
    network, or None when the network reaches the last address."""
    bits = 32 if version == 4 else 128
    end = number + (1 << (bits - prefixlen))
    return (number.to_bytes(bits // 8, "big"), timeout,
            None if end >> bits else end.to_bytes(bits // 8, "big"))


def _ranges(version, elements):
    """[((version, first, prefix length), ms left)] of an interval set's start/end
    elements. A range that is not one CIDR block (someone else's) is listed as
    the blocks that cover it."""
    bits = 32 if version == 4 else 128
    points = sorted((int.from_bytes(key, "big"), not flags & nfnetlink.NFT_SET_ELEM_INTERVAL_END,
                     left) for key, left, flags in elements)
    out, start = [], None
    for number, is_start, left in points + [(1 << bits, False, None)]:
        if start is not None:
            first, left_of_start = start
            size = number - first
            if size & (size - 1) == 0 and first % size == 0:
                out.append(((version, first, bits - size.bit_length() + 1), left_of_start))
            else:
                cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
                out += [((version, int(n.network_address), n.prefixlen), left_of_start)
                        for n in ipaddress.summarize_address_range(cls(first), cls(number - 1))]
            start = None
        if is_start:
            start = (number, left)
    return out


# Items per json.dumps call for a long list (see _json_text).
JSON_PIECE = 2000


def _json_text(value):
    """json.dumps(value), but a list longer than JSON_PIECE goes through the C encoder
    a piece at a time: one call holds the GIL for all of a 100k-element document
    (~100 ms), and the daemon loads documents on a worker beside its ban path."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(key)}: {_json_text(item)}"
                               for key, item in value.items()) + "}"
    if isinstance(value, list):
        if len(value) > JSON_PIECE:
            return "[" + ", ".join(json.dumps(value[start:start + JSON_PIECE])[1:-1]
                                   for start in range(0, len(value), JSON_PIECE)) + "]"
        return "[" + ", ".join(_json_text(item) for item in value) + "]"
    return json.dumps(value)


def _key_text(key):
    """A set key as nft writes it: a protocol name (inet_proto) or an address."""
    if len(key) == 1:
        return PROTOCOLS.get(key[0], str(key[0]))
    return str(ipaddress.ip_address(key))


def _first_error(stderr):
    """libnftables' first error line, which names what it refused."""
    for line in (stderr or "").splitlines():
        if line.strip() and not line.startswith((" ", "\t")) and "^" not in line:
            return line.strip()
    return (stderr or "").strip()
