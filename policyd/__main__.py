"""Entry point for `python3 -m policyd` and the `policyd` command."""
import sys


def main():
    from policyd.operator import bansview, testfilter
    if not (testfilter.quick(sys.argv[1:]) or bansview.quick(sys.argv[1:])):
        from policyd.operator.cli import main as cli
        cli()


if __name__ == "__main__":
    main()
