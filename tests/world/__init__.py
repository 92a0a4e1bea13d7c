"""Real servers on loopback for integration tests (DNS, HTTPS policy hosts, SMTP, Postfix)."""
