#!/usr/bin/env bash
# One entry point for the two things a fresh clone needs: `./dev.sh demo` and `./dev.sh test`.
# Both create .venv and install what they need (Debian packages included) on first use.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv

need_debian() {  # need_debian BINARY PACKAGE: install a Debian package when its binary is missing
  if [ -x "$1" ] || command -v "$1" >/dev/null 2>&1; then return 0; fi
  echo "installing Debian package $2 (for $1)" >&2
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq >/dev/null || true
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$2" >/dev/null
}

venv() {
  if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then need_debian /nonexistent python3-venv; fi
  local stamp="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v 'is ignored' || true
    "$VENV/bin/python" -c 'import meshlib, pytest' # fail loudly if the install did not work
    rm -f "$VENV"/.installed-* && touch "$stamp"
  fi
}

case "${1:-help}" in
  demo)
    venv
    shift
    exec "$VENV/bin/meshlib" demo "$@"
    ;;
  test)
    venv
    need_debian /usr/sbin/dnsmasq dnsmasq-base
    # grpc-js-xds, the third xDS client the control-plane double is checked against (its tests skip without it).
    if command -v npm >/dev/null 2>&1 && [ ! -d tests/servers/node/node_modules ]; then
      (cd tests/servers/node && timeout 180 npm install --no-audit --no-fund --loglevel=error >/dev/null 2>&1) || {
        rm -rf tests/servers/node/node_modules  # never half a package: the checks skip rather than fail
        echo "npm install in tests/servers/node failed: the grpc-js-xds checks will be skipped" >&2
      }
    fi
    # HashiCorp's Consul API double (@hashicorp/consul-api-double), an independent check of meshlib's Consul code.
    if command -v npm >/dev/null 2>&1 && [ ! -d tests/servers/consul_npm/node_modules ]; then
      (cd tests/servers/consul_npm && timeout 180 npm install --no-audit --no-fund --loglevel=error >/dev/null 2>&1) || {
        rm -rf tests/servers/consul_npm/node_modules  # never half a package: the checks skip rather than fail
        echo "npm install in tests/servers/consul_npm failed: the npm Consul double checks will be skipped" >&2
      }
    fi
    shift
    echo "== ruff" && "$VENV/bin/ruff" check meshlib tests examples benchmarks && "$VENV/bin/ruff" format --check meshlib tests examples benchmarks
    echo "== mypy --strict" && "$VENV/bin/mypy" --strict meshlib
    # The whole suite once per HTTP library: httpx, then httpx2 (Python >= 3.11; the top-level names and the
    # tests' `httpx` follow MESHLIB_HTTP_LIBRARY, see tests/httplib.py).
    status=0
    echo "== pytest on httpx" && MESHLIB_HTTP_LIBRARY=httpx "$VENV/bin/pytest" -q "$@" || status=$?
    if "$VENV/bin/python" -c 'import httpx2' 2>/dev/null; then
      echo "== pytest on httpx2" && MESHLIB_HTTP_LIBRARY=httpx2 "$VENV/bin/pytest" -q "$@" || status=$?
    else
      echo "== pytest on httpx2: skipped (httpx2 needs Python 3.11 or later)"
    fi
    exit $status
    ;;
  bench)
    venv
    need_debian /usr/sbin/nginx nginx-light
    need_debian /usr/sbin/haproxy haproxy
    bench_stamp="$VENV/.bench-$(sha1sum pyproject.toml | cut -c1-12)"
    if [ ! -f "$bench_stamp" ]; then
      "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev,bench]' 2>&1 | grep -v 'is ignored' || true
      rm -f "$VENV"/.bench-* && touch "$bench_stamp"
    fi
    shift
    exec "$VENV/bin/python" -m benchmarks "$@"
    ;;
  *)
    echo "usage: ./dev.sh demo | test [pytest args] | bench [s1 ... s10overload z1 z2 x1 c1] [--quick]" >&2
    exit 2
    ;;
esac
