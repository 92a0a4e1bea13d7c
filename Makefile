# stsmilter developer targets.
#
#   make demo   throw-away MTA-STS world on loopback: DNS, HTTPS policy hosts, a private
#               Postfix and `stsmilter run`; prints what happens to one message (as root)
#   make test   the whole test suite, exactly as CI runs it (sh contrib/bootstrap.sh test)
#
# Both need the Debian packages postfix and libmilter-dev (pymilter builds against it);
# `sh contrib/bootstrap.sh test`, run once as root, installs everything.

PYTHON3 ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
DEBS    := postfix libmilter-dev

.PHONY: demo test venv debs

demo: debs venv
	$(VPY) contrib/demo.py

test:
	sh contrib/bootstrap.sh test

# The demo's Debian dependencies: say what is missing instead of failing half-way.
debs:
	@missing=""; \
	for p in $(DEBS); do \
	    dpkg-query -W -f '$${Status}' "$$p" 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "make: missing Debian packages:$$missing" >&2; \
	    echo "make: run 'sh contrib/bootstrap.sh test' once as root, or: apt-get install -y$$missing" >&2; \
	    exit 1; \
	fi

# ./.venv with stsmilter (editable) and the test extras; created or completed only when
# something is missing, so `make demo` is cheap once it exists.
venv:
	@if ! $(VPY) -c 'import stsmilter, Milter, trustme, aiosmtpd, pytest' 2>/dev/null; then \
	    echo "make: setting up $(VENV) (python3 -m venv, pip install -e '.[test]')"; \
	    { [ -x $(VPY) ] || $(PYTHON3) -m venv $(VENV); } && \
	    $(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'; \
	fi
