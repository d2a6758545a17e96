#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian machine, then run it.
#   bash scripts/test.sh            # the whole suite
#   bash scripts/test.sh -k keys    # extra arguments go to pytest
# Installs memcached and redis-server (Debian packages) when missing, creates .venv with the
# package, its test and docs extras and PyTorch (CPU build 2.13.0), checks ruff, builds the
# docs site strictly (a broken page fails the run), runs pytest. The tests
# start their own servers on free loopback ports and stop them afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v memcached >/dev/null 2>&1 || missing+=(memcached)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if ((${#missing[@]})); then
  echo "==> installing ${missing[*]} (Debian packages)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  python3 -m venv .venv
fi
echo "==> installing memoshare with its test and docs extras"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,docs]'
if ! .venv/bin/python -c 'import torch' >/dev/null 2>&1; then
  # Exactly this version: a CPU build of it is available here; other specs pull in CUDA.
  echo "==> installing torch==2.13.0 (CPU)"
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
fi

echo "==> ruff"
.venv/bin/ruff check src tests benchmarks
echo "==> docs (mkdocs build --strict)"
site=$(mktemp -d)
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$site"
rm -rf "$site"
echo "==> pytest"
exec .venv/bin/python -m pytest "$@"
