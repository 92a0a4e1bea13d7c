# stsmilter developer targets.
#
#   make demo   throw-away MTA-STS world on loopback: DNS, HTTPS policy hosts, a private
#               Postfix and `stsmilter run`; prints what happens to one message (as root)
#   make test   the whole test suite, exactly as CI runs it (sh contrib/bootstrap.sh test)
#   make deb    the Debian 12 package, dist/stsmilter_VERSION_all.deb (as root: installs
#               the build dependencies of debian/control with apt when missing)
#   make mutate mutation testing (mutmut) of the modules that decide: one score line per
#               module (tests/mutation/mutate.py; 30-45 minutes on 2 cores; not part of CI)
#
# Both need the Debian packages postfix and libmilter-dev (pymilter builds against it);
# `sh contrib/bootstrap.sh test`, run once as root, installs everything.

PYTHON3 ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
DEBS    := postfix libmilter-dev

DIST    ?= dist
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' stsmilter/__init__.py)

.PHONY: demo test venv debs deb deb-deps mutate

demo: debs venv
	$(VPY) contrib/demo.py

test:
	sh contrib/bootstrap.sh test

mutate: venv
	@$(VPY) -c 'import mutmut, hypothesis' 2>/dev/null || \
	    $(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test,mutation]'
	$(VPY) tests/mutation/mutate.py

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

# The Build-Depends of debian/control (and build-essential), installed with apt when
# dpkg-checkbuilddeps (or dpkg-dev itself) is missing; bootstrap.sh test runs it too.
deb-deps:
	@if ! dpkg-checkbuilddeps >/dev/null 2>&1; then \
	    echo "make: installing the build dependencies of debian/control"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -qq && \
	    apt-get build-dep -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 ./; \
	fi

# dpkg-buildpackage writes its results into the parent directory of the tree: build in
# a temporary copy (what git tracks plus uncommitted edits; no venvs, no build output)
# so that nothing lands beside or inside the checkout except $(DIST)/*.deb. The build
# runs with the system PATH: Debian's python3 and tools, never a pyenv or venv one.
deb: deb-deps
	@set -e; \
	changelog=$$(dpkg-parsechangelog -S Version 2>/dev/null || sed -n '1s/.*(\(.*\)).*/\1/p' debian/changelog); \
	if [ "$$changelog" != "$(VERSION)" ]; then \
	    echo "make: debian/changelog says $$changelog, stsmilter/__init__.py $(VERSION)" >&2; exit 1; \
	fi; \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	src="$$tmp/stsmilter-$(VERSION)"; mkdir "$$src"; \
	tar -cf - --exclude=./.git --exclude='./.venv*' --exclude='./$(DIST)' --exclude=./build \
	    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache . | tar -xf - -C "$$src"; \
	(cd "$$src" && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -b --no-sign) > "$$tmp/build.log" 2>&1 || { \
	    tail -n 40 "$$tmp/build.log" >&2; echo "make: dpkg-buildpackage failed" >&2; exit 1; }; \
	mkdir -p "$(DIST)"; \
	cp "$$tmp/stsmilter_$(VERSION)_all.deb" "$(DIST)/"; \
	echo "make: $(DIST)/stsmilter_$(VERSION)_all.deb"
