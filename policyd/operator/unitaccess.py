"""Whether the installed policyd.service may reach an IP address: its
IPAddressAllow=/IPAddressDeny= lists merged from the unit file and its drop-ins
as systemd merges them, judged by systemd's rule (allow wins, then deny)."""
import ipaddress
from pathlib import Path

UNIT = "policyd.service"
# systemd's search path, highest priority first (/lib is /usr/lib on Debian 12).
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/lib/systemd/system",
             "/lib/systemd/system")
_KEYS = ("IPAddressAllow", "IPAddressDeny")
_WORDS = {"any": ("0.0.0.0/0", "::/0"), "localhost": ("127.0.0.0/8", "::1/128"),
          "link-local": ("169.254.0.0/16", "fe80::/64"), "multicast": ("224.0.0.0/4", "ff00::/8")}


def unit_files(dirs=UNIT_DIRS, unit=UNIT):
    """The unit file systemd loads (from the first directory that has it), then its
    drop-ins ordered by file name; a drop-in's name in a higher directory hides it below."""
    main = next((Path(d) / unit for d in dirs if (Path(d) / unit).is_file()), None)
    if main is None:
        return []
    dropins = {}
    for directory in reversed(dirs):
        for path in sorted((Path(directory) / f"{unit}.d").glob("*.conf")):
            dropins[path.name] = path
    return [main] + [dropins[name] for name in sorted(dropins)]


def ip_access(files):
    """{"IPAddressAllow": [networks], "IPAddressDeny": [networks]} of the [Service]
    sections of `files` in order: each assignment adds, an empty one resets."""
    lists = {key: [] for key in _KEYS}
    for path in files:
        section = None
        for line in Path(path).read_text(errors="replace").splitlines():
            line = line.strip()
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                continue
            key, equals, value = line.partition("=")
            key = key.strip()
            if section != "Service" or not equals or key not in _KEYS:
                continue
            if not value.strip():
                lists[key] = []
            for word in value.split():
                lists[key] += _networks(word)
    return lists


def _networks(word):
    try:
        return [ipaddress.ip_network(text, strict=False) for text in _WORDS.get(word, (word,))]
    except ValueError:
        return []    # systemd logs and skips an entry it cannot parse


def blocked(address, lists):
    """True if the unit may not talk to `address` (an ipaddress address)."""
    if any(address in network for network in lists["IPAddressAllow"]
           if network.version == address.version):
        return False
    return any(address in network for network in lists["IPAddressDeny"]
               if network.version == address.version)
