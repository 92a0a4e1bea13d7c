"""`stsmilter run -c CONFIG` that reports every module imported after the privilege drop.

Usage: python tests/world/late_imports.py CONFIG. Runs the daemon exactly as
`python -m stsmilter run` does, and from the moment preflight.drop_privileges() returns
prints one line ``late-import: NAME`` on stderr for each module (codecs included: they
are modules under ``encodings``) that Python has to find on disk. A service user that
cannot read the interpreter's library (a pyenv under /root) fails on each of these, so
daemon.import_everything() must have loaded them all before the drop. Without a user
to drop to (not root), the daemon skips import_everything(); this wrapper runs it at the
same point, so that the run shows what a real drop would have left out.
"""

import sys

from stsmilter import cli, config
from stsmilter.service import daemon, preflight


class _Reporter:
    """A meta path finder that finds nothing: it only sees each import that misses
    sys.modules (the only ones that touch the file system)."""

    def find_spec(self, name, path=None, target=None):
        sys.stderr.write(f"late-import: {name}\n")
        sys.stderr.flush()
        return None


_drop_privileges = preflight.drop_privileges


def _drop_and_report(identity):
    if identity is None:  # what enter_service_identity() runs before a real drop
        daemon.import_everything(config.load(sys.argv[1]))
    _drop_privileges(identity)
    sys.meta_path.insert(0, _Reporter())


preflight.drop_privileges = _drop_and_report

if __name__ == "__main__":
    sys.exit(cli.main(["run", "-c", sys.argv[1]]))
