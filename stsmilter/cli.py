"""Placeholder replaced by the real CLI."""
def main(argv=None):
    return 0
