"""Command line: parse arguments, call the owning module, print the result.

Kept thin on purpose; every decision lives in the modules it calls.
"""
import click


@click.group()
def main():
    """policyd: guard Ollama's port with an nftables allowlist and bans."""
