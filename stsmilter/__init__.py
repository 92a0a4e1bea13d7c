"""stsmilter: MTA-STS (RFC 8461) enforcement for Postfix and Sendmail."""

__version__ = "0.1.0"
