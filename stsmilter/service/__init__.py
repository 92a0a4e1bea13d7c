"""What turns the engine and the front ends into a daemon: `stsmilter run` (daemon.py),
the checks and privilege drop before serving (preflight.py), the PID file, the cache
control socket, the open-files budget and the /metrics HTTP server.
"""
