"""The kernel adapter: the only module that imports `nftables`.

Loads compiled documents in one transaction, dry-runs them, lists what is
loaded, and keeps ban elements in step. Ban element changes go over raw
nfnetlink (policyd.nfnetlink) because libnftables rebuilds its whole cache on
every command, which costs hundreds of ms once a large allowlist is loaded.
"""
import errno
import ipaddress
import json

import nftables

from policyd import nfnetlink
from policyd.compile import BAN_SETS, FAMILY
from policyd.errors import KernelError

PROTOCOLS = {6: "tcp", 17: "udp"}


class Nft:
    """One long-lived libnftables context, bound to the current network namespace."""

    def __init__(self):
        self._ctx = nftables.Nftables()
        self._ctx.set_handle_output(False)
        self.netlink = nfnetlink.Netlink()

    def close(self):
        """Free the libnftables context (and its cache) now, not at garbage collection."""
        self.netlink.close()
        self._ctx = None

    def _run(self, command):
        rc, out, err = self._ctx.cmd(command)
        if rc != 0:
            raise KernelError(_first_error(err) or f"nft failed: {command}")
        return out

    def load(self, document):
        """Run `document` as one transaction; on refusal nothing changed."""
        self._json(document, dry_run=False)

    def check(self, document):
        """Prove `document` would load, without changing anything."""
        self._json(document, dry_run=True)

    def _json(self, document, dry_run):
        old = self._ctx.set_dry_run(dry_run)
        json_before = self._ctx.set_json_output(True)  # what json_cmd() does, with _json_text
        try:
            rc, _out, err = self._ctx.cmd(_json_text(document))
        finally:
            self._ctx.set_dry_run(old)
            self._ctx.set_json_output(json_before)
        if rc != 0:
            raise KernelError(_first_error(err) or "nftables refused the transaction")

    def ruleset(self):
        """`nft list ruleset`, as text."""
        return self._run("list ruleset")

    def tables(self):
        """Names of the inet tables that exist (over netlink: cheap enough to poll)."""
        return sorted(self.netlink.table_names())

    def skeleton(self, table):
        """Chains with rule counts and set names of one table (see compile.skeleton)."""
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


class BanTable:
    """The ban sets of one ban table: add, remove and list bans (BanKernel)."""

    def __init__(self, nft, table, ipv6_prefix):
        self.nft = nft
        self.table = table
        self.ipv6_prefix = ipv6_prefix
        self._netlink = nft.netlink

    def add_bans(self, bans):
        """Add (network, timeout seconds) pairs in one transaction.

        An element that exists already is replaced, so its timeout is the new one.
        """
        if bans:
            self._netlink.replace(self.table, self._by_set(bans))

    def remove_bans(self, networks):
        if networks:
            self._netlink.delete(self.table, self._by_set((n, None) for n in networks))

    def _by_set(self, pairs):
        """set name -> [(key bytes, timeout)]; IPv6 keys masked to the ban prefix.

        Works on integers: restoring 100k bans must not format and parse 100k strings.
        """
        mask6 = ((1 << 128) - 1) ^ ((1 << (128 - self.ipv6_prefix)) - 1)
        changes = {BAN_SETS[4]: [], BAN_SETS[6]: []}
        for network, timeout in pairs:
            key = network.network_address.packed
            if network.version == 6:
                key = (int.from_bytes(key, "big") & mask6).to_bytes(16, "big")
            if timeout is not None:
                timeout = max(1, int(timeout))
            changes[BAN_SETS[network.version]].append((key, timeout))
        return {name: items for name, items in changes.items() if items}

    def replace_ban_keys(self, items):
        """add_bans by key: [((version, first address as int, prefix length), seconds)],
        one transaction, existing elements take the new timeout. No ipaddress objects:
        a flood bans 100k networks."""
        if items:
            self._netlink.replace(self.table, self._keys_by_set(items))

    def add_ban_keys(self, items):
        """Restore [((version, first address as int, prefix length), seconds)] in one batch.

        The bulk path for restores: no ipaddress objects, and elements already
        in the kernel keep counting down instead of being replaced.
        """
        self._netlink.add(self.table, self._keys_by_set(items))

    def _keys_by_set(self, items):
        changes = {BAN_SETS[4]: [], BAN_SETS[6]: []}
        mask6 = ((1 << 128) - 1) ^ ((1 << (128 - self.ipv6_prefix)) - 1)
        for (version, number, _prefixlen), timeout in items:
            if version == 4:
                changes[BAN_SETS[4]].append((number.to_bytes(4, "big"), max(1, int(timeout))))
            else:
                changes[BAN_SETS[6]].append(((number & mask6).to_bytes(16, "big"),
                                             max(1, int(timeout))))
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
        for version, name in BAN_SETS.items():
            prefix = 32 if version == 4 else self.ipv6_prefix
            try:
                keys = self._netlink.set_keys(self.table, name)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    continue  # the table is gone; the daemon restores it
                raise
            for key, left in keys.items():
                found[(version, int.from_bytes(key, "big"), prefix)] = left
        return found


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
