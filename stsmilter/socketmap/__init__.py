"""The socketmap front end: Postfix's smtp_tls_policy_maps and Sendmail's FEATURE(`sts')
ask it at delivery time (the part that stops a STARTTLS-stripping attacker).

connection.py speaks the netstring protocol on one connection (pipelining, the fast
path from memory); server.py is the listener, its thread and the limits across
connections. The answers themselves are the engine's (engine/tlspolicy.py).
"""
