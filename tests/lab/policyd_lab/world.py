"""The usual namespace world: a server with two neighbours, and its addresses.

`trusted` sits on the server's lan0 (192.0.2.0/24, 2001:db8:1::/64) and
`stranger` on its wan0 (198.51.100.0/24, 2001:db8:2::/64). Tests get it from the
`world` fixture (tests/netns/conftest.py); benchmarks and the demo build it here.
"""
import textwrap

SERVER_V4, SERVER_V6 = "192.0.2.1", "2001:db8:1::1"
SERVER_WAN_V4, SERVER_WAN_V6 = "198.51.100.1", "2001:db8:2::1"
TRUSTED_V4, TRUSTED_V6 = "192.0.2.10", "2001:db8:1::10"
STRANGER_V4, STRANGER_V6 = "198.51.100.20", "2001:db8:2::20"


class World:
    def __init__(self, lab):
        self.lab = lab
        self.server = lab.host("srv")
        self.trusted = lab.host("trusted")
        self.stranger = lab.host("stranger")
        lab.link(self.server, self.trusted, [f"{SERVER_V4}/24", f"{SERVER_V6}/64"],
                 [f"{TRUSTED_V4}/24", f"{TRUSTED_V6}/64"], a_ifname="lan0", b_ifname="eth0")
        lab.link(self.server, self.stranger, [f"{SERVER_WAN_V4}/24", f"{SERVER_WAN_V6}/64"],
                 [f"{STRANGER_V4}/24", f"{STRANGER_V6}/64"], a_ifname="wan0", b_ifname="eth0")

    def policy(self, text, name="policy.yaml"):
        path = self.lab.tmp / name
        path.write_text(textwrap.dedent(text))
        return str(path)
