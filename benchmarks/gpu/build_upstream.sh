#!/usr/bin/env bash
# On the GPU machine, after install.sh: build upstream LMCache's C++ and CUDA extensions in place
# (/tmp/site-upstream/src) against this machine's torch, for this GPU's architecture only, and
# check that its vLLM adapter imports with them. Idempotent (a stamp holds the bundle's hash).
# bench_serve.py --upstream-build runs it while the other servers start. ~90 s with nvcc 13 on 16
# cores (its sdist: the PyPI wheel's ops do not load with torch 2.11).
set -euo pipefail

site=${GPU_SITE:-/tmp/site}
upstream=${GPU_UPSTREAM:-/tmp/site-upstream}
python=${PYTHON:-python3}
[[ -f $site/.bundle ]] || { echo "build_upstream.sh: no bundle in $site (run install.sh first)" >&2; exit 1; }
hash=$(cat "$site/.bundle")
if [[ -f $upstream/.built && $(cat "$upstream/.built") == "$hash" ]]; then
  echo "build_upstream.sh: upstream LMCache already built for bundle $hash"
  exit 0
fi
t=$SECONDS
if [[ -d /usr/local/cuda/bin ]]; then export PATH=$PATH:/usr/local/cuda/bin CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}; fi
arch=$("$python" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)
if ! (cd "$upstream/src" && PYTHONPATH=$upstream/build TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-$(nproc)} \
      "$python" setup.py build_ext --inplace >"$upstream/build.log" 2>&1); then
  tail -40 "$upstream/build.log" >&2
  echo "build_upstream.sh: the build failed after $((SECONDS - t)) s (log: $upstream/build.log)" >&2
  exit 1
fi
echo "build_upstream.sh: ops built for sm_${arch/./} in $((SECONDS - t)) s: $(find "$upstream/src/lmcache" -maxdepth 1 -name '*.so' -printf '%f ')"
t=$SECONDS
# From $upstream, not the checkout: `python -c` puts the working directory first on sys.path.
cd "$upstream" && PYTHONPATH=$upstream/src:$upstream/deps:$site "$python" -c '
import lmcache, lmcache.cuda_ops
from lmcache.integration.vllm.vllm_v1_adapter import LMCacheConnectorV1Impl
assert "/src/lmcache" in lmcache.__file__, lmcache.__file__
print("build_upstream.sh: upstream lmcache", lmcache.__version__, "imports; ops:", lmcache.cuda_ops.__file__)'
echo "build_upstream.sh: imports checked in $((SECONDS - t)) s"
echo "$hash" > "$upstream/.built"
