"""policyd: an nftables allowlist and ban daemon that guards Ollama's port.

The package splits into policy -> compile -> nft (the kernel adapter) and
log -> filters -> bans -> nft, wired together by the daemon and the CLI.
"""

__version__ = "0.1.0"
