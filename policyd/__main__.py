"""Entry point for `python3 -m policyd` and the `policyd` command."""
import sys


def main():
    from policyd.testfilter import quick
    if not quick(sys.argv[1:]):
        from policyd.cli import main as cli
        cli()


if __name__ == "__main__":
    main()
