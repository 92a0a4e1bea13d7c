"""`stsmilter run -c CONFIG` that reports every module imported after the privilege drop.

Usage: python tests/world/late_imports.py CONFIG. Runs the daemon exactly as
`python -m stsmilter run` does, and from the moment daemon.drop_privileges() returns
prints one line ``late-import: NAME`` on stderr for each module (codecs included: they
are modules under ``encodings``) that Python has to find on disk. A service user that
cannot read the interpreter's library (a pyenv under /root) fails on each of these, so
daemon.import_everything() must have loaded them all before the drop.
"""

import sys

from stsmilter import cli, daemon


class _Reporter:
    """A meta path finder that finds nothing: it only sees each import that misses
    sys.modules (the only ones that touch the file system)."""

    def find_spec(self, name, path=None, target=None):
        sys.stderr.write(f"late-import: {name}\n")
        sys.stderr.flush()
        return None


_drop_privileges = daemon.drop_privileges


def _drop_and_report(ids):
    _drop_privileges(ids)
    sys.meta_path.insert(0, _Reporter())


daemon.drop_privileges = _drop_and_report

if __name__ == "__main__":
    sys.exit(cli.main(["run", "-c", sys.argv[1]]))
