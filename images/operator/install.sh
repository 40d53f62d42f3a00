#!/bin/sh
# The operator image's install steps, run by images/operator/Dockerfile and, unchanged, by
# `make images-check` in a clean venv (no Docker engine in CI).
# Usage: install.sh SRC VENV  (SRC holds operator/ and images/operator/ as in the repo)
set -eu
src=$1
venv=$2

# No pip inside the venv: it is copied into the final stage, which must not carry build tools.
python3 -m venv --without-pip "$venv"
pip() { python3 -m pip --python "$venv/bin/python" --disable-pip-version-check "$@"; }
# Locked and hashed wheels only: nothing is compiled, nothing resolves differently tomorrow.
pip install --no-cache-dir --require-hashes --only-binary=:all: --no-deps \
  -r "$src/images/operator/requirements.txt"
pip install --no-cache-dir --no-deps "$src/operator"
pip check
# Only the operator's dependencies: a torch in this venv would mean a wrong lock.
"$venv/bin/python" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is not None)'
"$venv/bin/python" -c 'import kopf, kubernetes, lmcache_operator'
