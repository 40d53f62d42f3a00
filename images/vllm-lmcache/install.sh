#!/bin/sh
# Adds lmcache-kube to the vLLM image, run by images/vllm-lmcache/Dockerfile and, unchanged, by
# `make images-check` against an environment holding the same vLLM and torch.
# Usage: install.sh SRC  (SRC holds pyproject.toml, lmcache/ and images/vllm-lmcache/)
set -eu
src=$1
# The vLLM image owns torch and vLLM: install only the locked extras, then our package without
# resolving its dependencies, so pip can never swap the CUDA build of torch.
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# vllm/vllm-openai ships vLLM's KV connectors, which bundle upstream `lmcache` under the same
# import name: installed over it, ours would share a package directory with its leftover modules.
python3 -m pip uninstall --yes lmcache
python3 -m pip install --no-cache-dir --require-hashes --only-binary=:all: --no-deps \
  -r "$src/images/vllm-lmcache/requirements.txt"
python3 -m pip install --no-cache-dir --no-deps "$src"
# Every requirement of lmcache-kube (torch range included) must be met by what is installed.
# Problems pip finds in the base image's own packages are not ours to fix here.
if python3 -m pip check | grep -i '^lmcache-kube '; then
  echo "lmcache-kube's requirements are not met by the image" >&2
  exit 1
fi
python3 "$src/images/vllm-lmcache/check_lmcache_owner.py"
python3 -c 'import lmcache, lmcache.integration.vllm, torch, vllm'
