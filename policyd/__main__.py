"""Entry point for `python3 -m policyd`."""

from policyd.cli import main

main()
