#!/bin/sh
# Set up stsmilter from this source tree on a fresh Debian machine (as root) and either
# run the daemon with the shipped configuration or run the whole test suite.
#
#   sh contrib/bootstrap.sh run    # apt deps, venv in ./.venv, user stsmilter, stsmilter run
#   sh contrib/bootstrap.sh test   # apt deps (incl. postfix), venv, pytest over tests/,
#                                  # then again on Debian's own Python libraries
#
# Idempotent: steps already done are cheap to repeat.
set -eu

mode=${1:-}
case "$mode" in
    run|test) ;;
    *) echo "usage: sh contrib/bootstrap.sh run|test" >&2; exit 2 ;;
esac

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
venv="$top/.venv"

need_apt=""
# libmilter-dev: pymilter builds from source against it; gcc/python3-dev for that build.
pkgs="libmilter-dev gcc python3-dev python3-venv"
if [ "$mode" = test ]; then
    # postfix: the integration tests start private Postfix instances on loopback;
    # the shell scripts are linted with shellcheck; sendmail-cf (m4 files only, no Sendmail)
    # builds contrib/sendmail/stsmilter.mc; mandoc lints the man pages; sasl2-bin
    # (saslpasswd2) and libsasl2-modules (PLAIN) give the shipped submission services'
    # test a private Cyrus SASL user; unbound: the DANE tests start a private validating
    # resolver (never the system service); redis-server: the fleet tests start a private
    # Redis on loopback (never the system service); logrotate runs the shipped
    # contrib/logrotate/stsmilter on a private copy of the init script's log.
    pkgs="$pkgs postfix shellcheck sendmail-cf mandoc sasl2-bin libsasl2-modules unbound redis-server"
    pkgs="$pkgs logrotate"
    # The second run uses Debian 12's own libraries, the ones the .deb depends on
    # (setuptools and wheel build stsmilter into that venv); tests/system/test_deb.py builds
    # the package with make (its build dependencies come from debian/control), checks
    # it with lintian and reads its man page with man. python3-redis (4.3): [cache] redis.
    pkgs="$pkgs python3-milter python3-dnspython python3-cachetools python3-prometheus-client python3-idna"
    pkgs="$pkgs python3-h11"
    pkgs="$pkgs python3-redis python3-setuptools python3-wheel make lintian man-db"
    # python3-yaml (6.0): stsmilter import-config (a Recommends of the .deb); util-linux
    # and iproute2 (unshare, ip): the side-by-side test with postfix-mta-sts-resolver runs
    # in a network namespace of its own.
    pkgs="$pkgs python3-yaml util-linux iproute2"
fi
for p in $pkgs; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need_apt="$need_apt $p"
done
if [ -n "$need_apt" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "bootstrap: missing Debian packages:$need_apt (run as root)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    # Install Postfix without letting debconf configure it as a live mail system.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq
    # shellcheck disable=SC2086 # a list of package names, split on purpose
    apt-get install -y -qq --no-install-recommends $need_apt
fi

# tests/system/test_deb.py builds the Debian package: its build dependencies now, not
# inside a test with a timeout.
if [ "$mode" = test ] && [ "$(id -u)" = 0 ]; then
    make -s deb-deps
fi

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
if [ "$mode" = test ]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
    # Both runs: a skip that tests/skips-allowed.txt does not list fails the run (and
    # names the test), and so does a run in which no test passed (tests/conftest.py).
    STSMILTER_STRICT_SKIPS=1
    export STSMILTER_STRICT_SKIPS
    status=0
    "$venv/bin/python" -m pytest -p no:cacheprovider -ra tests || status=$?
    # Again with Debian's /usr/bin/python3 and python3-* packages (dnspython 2.3,
    # prometheus-client 0.16, ...): pip finds the runtime dependencies satisfied by
    # them and adds only missing test tools. The package test ran above already.
    debvenv="$top/.venv-debian"
    if [ ! -x "$debvenv/bin/python" ]; then
        /usr/bin/python3 -m venv --system-site-packages "$debvenv"
    fi
    "$debvenv/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[test]"
    debian_status=0
    STSMILTER_DEBIAN_LIBS=1 "$debvenv/bin/python" -m pytest -p no:cacheprovider -ra -m "not deb" tests \
        || debian_status=$?
    [ "$status" != 0 ] && exit "$status"
    exit "$debian_status"
fi

"$venv/bin/python" -m pip install -q --disable-pip-version-check .
if [ "$(id -u)" = 0 ] && ! getent passwd stsmilter >/dev/null; then
    useradd --system --home-dir /var/lib/stsmilter --no-create-home \
        --shell /usr/sbin/nologin stsmilter
fi
exec "$venv/bin/stsmilter" run -c "$top/etc/stsmilter.conf"
