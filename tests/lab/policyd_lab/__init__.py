"""policyd's test lab: throwaway network namespaces with real servers in them.

Shared by tests/netns, tests/kernel, bench/ and demo/; installed editable by
`make setup` from tests/lab (its own pyproject.toml) and never part of the
Debian package, which builds only the `policyd` packages of the top pyproject.

netlab: namespaces, links, listeners, `policyd run` in a namespace, waits.
world: the server with a trusted and a stranger neighbour, and its addresses.
proxies, ollama_standin, webclient: nginx and Caddy in front of a stand-in
Ollama, and the HTTP client that talks to them from another namespace.
fleetlab: several nodes and a Redis on one bridge. journal_files: real
journal files written by systemd-journal-remote. policies, nginxlog: the policy
texts and nginx failure lines the tests write. packetcount: a client that
connects in a loop and kernel counters that say how many of its packets
policyd's chains dropped. fixtures: `lab` and `world` for pytest.
"""
