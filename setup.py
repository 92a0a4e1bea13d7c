import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "stsmilter" / "__init__.py").read_text(), re.M
).group(1)

setup(
    name="stsmilter",
    version=VERSION,
    description="MTA-STS (RFC 8461) enforcement milter and TLS-policy socketmap for Postfix and Sendmail",
    long_description=(HERE / "README.rst").read_text(),
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["stsmilter", "stsmilter.*"]),
    install_requires=[
        "pymilter>=1.0.5",
        "dnspython>=2.4",
        "cachetools>=5.0",
        "prometheus-client>=0.17",
        # IDNA 2008 (UTS 46) for recipient domains; the stdlib codec is IDNA 2003.
        "idna>=3.4",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout>=2.1",
            "trustme>=1.0",
            "aiosmtpd>=1.4",
            # README.rst and HACKING.rst must render (tests/test_docs.py)
            "docutils>=0.18",
            # contrib/prometheus/stsmilter-rules.yml must parse (tests/test_contrib.py)
            "PyYAML>=6",
        ],
    },
    entry_points={"console_scripts": ["stsmilter = stsmilter.cli:main"]},
    data_files=[("share/man/man8", ["man/stsmilter.8"]), ("share/man/man5", ["man/stsmilter.conf.5"])],
    classifiers=[
        "Environment :: No Input/Output (Daemon)",
        "Topic :: Communications :: Email :: Filters",
        "Programming Language :: Python :: 3",
    ],
)
