"""Thin shim: the metadata lives in pyproject.toml (PEP 621).

What [project] cannot express stays here: the man pages, installed under
<prefix>/share/man so that man(1) finds them (/usr/share/man for the .deb, the venv's
share/man for a venv, which man-db searches when the venv's bin/ is on PATH).
"""

from setuptools import setup

setup(
    license="MIT",
    data_files=[
        ("share/man/man8", ["man/stsmilter.8"]),
        ("share/man/man5", ["man/stsmilter.conf.5"]),
    ],
)
