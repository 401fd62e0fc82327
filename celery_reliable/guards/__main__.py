"""``python -m celery_reliable.guards admit``: print a composed script (admit, complete, ...)."""

from __future__ import annotations

import sys

from ..scripts import script
from . import COMPOSED


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in COMPOSED:
        print(f"usage: python -m celery_reliable.guards {{{','.join(sorted(COMPOSED))}}}",
              file=sys.stderr)
        return 2
    sys.stdout.write(script(argv[0]).source)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
