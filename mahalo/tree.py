"""``python -m mahalo.tree``: a picture of one prompt's search.

    python -m mahalo.tree OUTPUT.jsonl --index I --out tree.html
    python -m mahalo.tree OUTPUT.jsonl --index I --out tree.png

OUTPUT.jsonl is the output=FILE of ``python -m mahalo.decode``; --index picks the prompt (not
needed when the file holds one). The HTML is one self-contained file (no network); the PNG needs
matplotlib (``pip install 'mahalo[plot]'``). Bad input ends with one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from mahalo.app.draw import read_record, search_of, write

USAGE = __doc__.split("\n\n")[1]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2 (in main), as every mahalo command
        raise ValueError(f"{message} (usage: python -m mahalo.tree OUTPUT.jsonl --index I --out tree.html)")


def main(argv: list[str] | None = None) -> int:
    """Draw the search; returns the exit code: 0, or 2 for bad input (one line on stderr)."""
    parser = _Parser(prog="python -m mahalo.tree", description=__doc__.split("\n\n")[0], epilog=USAGE,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="a JSONL file written by python -m mahalo.decode ... output=FILE")
    parser.add_argument("--index", type=int, default=None, help="the prompt's index (its record's 'index')")
    parser.add_argument("--out", required=True, help="the picture: a .html or a .png file")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        search = search_of(read_record(args.output, args.index), args.output)
        kind = write(search, args.out)
    except ValueError as err:
        print(f"mahalo.tree: error: {err}", file=sys.stderr)
        return 2
    cands = sum(len(s.candidates) for s in search.steps)
    steps = len(search.steps)
    print(f"wrote {args.out}: {kind}, prompt {search.index}, {steps} step{'s' * (steps != 1)}, "
          f"{cands} candidate{'s' * (cands != 1)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
