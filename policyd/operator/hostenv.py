"""The real host as `policyd doctor` asks it (HostEnvironment): sockets, interfaces,
files, the kernel's tables, systemd units, the daemon's socket. Tests give
doctor a fake with the same methods.
"""
import errno
import ipaddress
import os
import socket
import time
from pathlib import Path

from policyd.policy.store import PolicyStore


class HostEnvironment:
    """The facts diagnose() needs, read from this host and network namespace."""

    def __init__(self, state_dir, run_dir, nft_factory, systemd_dir="/etc/systemd/system",
                 proc_dir="/proc", filter_dirs=None, clock=time.time, unit_dirs=None):
        self.state_dir = str(state_dir)
        self.run_dir = Path(run_dir)
        self.store = PolicyStore(state_dir)
        self._nft_factory = nft_factory
        self._nft = None
        self.systemd_dir = Path(systemd_dir)
        self.proc_dir = Path(proc_dir)
        self.filter_dirs = filter_dirs
        self.unit_dirs = unit_dirs
        self.now = clock

    def _kernel(self):
        if self._nft is None:
            self._nft = self._nft_factory()
        return self._nft

    def kernel_tables(self):
        return self._kernel().tables()

    def table_objects(self, table):
        """Over netlink: libnftables would fetch and format every element first."""
        from policyd.kernel import nllist
        return nllist.table_objects(self._kernel().netlink, table)

    def kernel_features(self):
        return self._kernel().features()

    def listeners(self, ports, proto="tcp"):
        from policyd.operator import netdiag
        return netdiag.listeners(ports, proto)

    def socket_owners(self, inodes):
        """inode -> [(pid, command name)] for the sockets among `inodes`, from /proc."""
        wanted = {f"socket:[{inode}]": inode for inode in inodes}
        owners = {}
        for entry in self.proc_dir.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fds = list((entry / "fd").iterdir())
            except OSError:
                continue  # gone, or not ours to read
            for fd in fds:
                try:
                    inode = wanted.get(os.readlink(fd))
                except OSError:
                    continue
                if inode is None:
                    continue
                try:
                    name = (entry / "comm").read_text().strip()
                except OSError:
                    name = "?"
                pair = (int(entry.name), name)
                if pair not in owners.setdefault(inode, []):
                    owners[inode].append(pair)
        return {inode: sorted(pairs) for inode, pairs in owners.items()}

    def interfaces(self):
        """Names of this namespace's network interfaces (glibc asks rtnetlink)."""
        return [name for _index, name in socket.if_nameindex()]

    def open_log(self, path):
        """Open and close `path` for reading; OSError says why it cannot be read."""
        if not os.access(path, os.R_OK) and os.path.exists(path):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), path)
        with open(path, "rb"):
            pass

    def load_filter(self, name):
        from policyd.logs.filters import load_filter
        return load_filter(name, self.filter_dirs)

    def nftables_service_links(self):
        return sorted(str(p) for p in self.systemd_dir.glob("*.wants/nftables.service"))

    def unit_ip_access(self):
        """(files, IP access lists) of the installed policyd unit, or None if there is none."""
        from policyd.operator import unitaccess
        files = (unitaccess.unit_files(self.unit_dirs) if self.unit_dirs is not None
                 else unitaccess.unit_files())
        return (files, unitaccess.ip_access(files)) if files else None

    @staticmethod
    def resolve(host):
        """The addresses `host` (a name or an address) resolves to; none if it does not."""
        try:
            found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            return []
        return sorted({ipaddress.ip_address(info[4][0].split("%")[0]) for info in found},
                      key=lambda a: (a.version, a))

    def control_socket_path(self):
        from policyd.operator import control  # its socket name; imported only when asked
        return control.socket_path(self.run_dir)

    def daemon_status(self):
        """The running daemon's `status` answer, or None when none answers."""
        from policyd.operator import control
        try:
            return control.request(self.run_dir, "status")
        except (control.DaemonUnavailable, control.ControlError, OSError):
            return None

    def control_socket_state(self):
        """"listening", "stale" (a socket file nobody answers on), "denied" or "missing"."""
        path = self.control_socket_path()
        if not path.exists():
            return "missing"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            try:
                sock.connect(str(path))
            except PermissionError:
                return "denied"
            except OSError:
                return "stale"
        return "listening"
