"""Where things are, for tests in any directory under tests/: the checkout's root, the
tests directory, the real-part scripts in world/ and the stored cache files in data/."""

from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
ROOT = TESTS.parent
WORLD = TESTS / "world"
DATA = TESTS / "data"
