"""What every entry point shares: one way to fail (a line on stderr, exit status 2) and absl's flag parser
made to fail that way too (absl's own exits with status 1 and a usage dump)."""

from __future__ import annotations

import sys

from absl import flags


def fail(message) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def parse_flags(argv):
    """`app.run(main, flags_parser=parse_flags)`: absl's parse, but a bad flag ends the run as every other
    failure does: one line, status 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(fail(e))
