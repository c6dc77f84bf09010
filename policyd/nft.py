"""The kernel adapter: the only module that imports `nftables`.

Loads compiled documents in one transaction, dry-runs them, lists what is
loaded, and keeps ban elements in step. Ban element changes go over raw
nfnetlink (policyd.nfnetlink) because libnftables rebuilds its whole cache on
every command, which costs hundreds of ms once a large allowlist is loaded.
"""
import ipaddress
import json

import nftables

from policyd import nfnetlink
from policyd.compile import BAN_SETS, FAMILY, ban_element
from policyd.errors import KernelError


class Nft:
    """One long-lived libnftables context, bound to the current network namespace."""

    def __init__(self):
        self._ctx = nftables.Nftables()
        self._ctx.set_handle_output(False)

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
        try:
            rc, _out, err = self._ctx.json_cmd(document)
        finally:
            self._ctx.set_dry_run(old)
        if rc != 0:
            raise KernelError(_first_error(err) or "nftables refused the transaction")

    def ruleset(self):
        """`nft list ruleset`, as text."""
        return self._run("list ruleset")

    def tables(self):
        """Names of the inet tables that exist."""
        out = self._json_list("list tables inet")
        return sorted(o["table"]["name"] for o in out if "table" in o)

    def table_objects(self, table):
        """The JSON objects of one inet table, or [] if it does not exist."""
        if table not in self.tables():
            return []
        return self._json_list(f"list table {FAMILY} {table}")

    def set_elements(self, table, name):
        """Elements of one set: list of (value, timeout seconds or None, expires or None)."""
        out = self._json_list(f"list set {FAMILY} {table} {name}")
        elements = []
        for obj in out:
            for elem in obj.get("set", {}).get("elem", []):
                if isinstance(elem, dict) and "elem" in elem:
                    inner = elem["elem"]
                    elements.append((_value(inner["val"]), inner.get("timeout"),
                                     inner.get("expires")))
                else:
                    elements.append((_value(elem), None, None))
        return elements

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
        self._netlink = nfnetlink.SetElements()

    def add_bans(self, bans):
        """Add (network, timeout seconds) pairs in one transaction.

        An element that exists already is replaced, so its timeout is the new one.
        """
        if not bans:
            return
        changes = {}
        for network, timeout in bans:
            name, value = ban_element(network, self.ipv6_prefix)
            changes.setdefault(name, []).append((ipaddress.ip_address(value), max(1, int(timeout))))
        self._netlink.replace(self.table, changes)

    def remove_bans(self, networks):
        if not networks:
            return
        changes = {}
        for network in networks:
            name, value = ban_element(network, self.ipv6_prefix)
            changes.setdefault(name, []).append(ipaddress.ip_address(value))
        self._netlink.delete(self.table, changes)

    def list_bans(self):
        """network -> seconds left, as the kernel holds them."""
        bans = {}
        for version, name in BAN_SETS.items():
            try:
                elements = self.nft.set_elements(self.table, name)
            except KernelError:
                continue  # the table is gone; the caller restores it
            for value, timeout, expires in elements:
                prefix = 32 if version == 4 else self.ipv6_prefix
                network = ipaddress.ip_network((value, prefix), strict=False)
                bans[network] = expires if expires is not None else (timeout or 0)
        return bans

    def close(self):
        self._netlink.close()


def _value(raw):
    if isinstance(raw, dict) and "prefix" in raw:
        return f'{raw["prefix"]["addr"]}/{raw["prefix"]["len"]}'
    return raw


def _first_error(stderr):
    """libnftables' first error line, which names what it refused."""
    for line in (stderr or "").splitlines():
        if line.strip() and not line.startswith((" ", "\t")) and "^" not in line:
            return line.strip()
    return (stderr or "").strip()
