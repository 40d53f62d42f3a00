#!/usr/bin/env bash
# On the GPU machine: add one part of `make gpu-bundle`'s output, and once every part is there,
# install it. Usage: benchmarks/gpu/install.sh .gpu/partN   (any order; running it again is a no-op)
#
#   /tmp/gpu            the slices collected so far (survives between calls while the machine is warm)
#   /tmp/site           vLLM and what it needs beyond the image, byte-compiled, imports checked
#   /tmp/site-upstream  upstream LMCache: src/ (its ops are built there by build_upstream.sh),
#                       deps/ (on its server's path), build/ (setuptools for the build only)
#
# Exit 0 with "waiting for" while parts are missing (then /tmp/site/.bundle does not exist), 0 with
# "ready" once installed, 1 on an error.
# The folders can be moved with GPU_STAGE, GPU_SITE and GPU_UPSTREAM; PYTHON names the interpreter.
set -euo pipefail

part=${1:?usage: install.sh PARTDIR (a .gpu/partN folder)}
stage=${GPU_STAGE:-/tmp/gpu}
site=${GPU_SITE:-/tmp/site}
upstream=${GPU_UPSTREAM:-/tmp/site-upstream}
python=${PYTHON:-python3}
start=$SECONDS

[[ -f $part/MANIFEST ]] || { echo "install.sh: $part has no MANIFEST (not a gpu-bundle part)" >&2; exit 1; }
mkdir -p "$stage"
if [[ -f $stage/MANIFEST ]] && ! cmp -s "$part/MANIFEST" "$stage/MANIFEST"; then
  echo "install.sh: $part is from another bundle than the parts in $stage; starting over" >&2
  rm -rf "${stage:?}"/*
fi
cp "$part/MANIFEST" "$stage/MANIFEST"
for slice in "$part"/bundle.tar.xz.*; do
  if ! cmp -s "$slice" "$stage/${slice##*/}"; then cp "$slice" "$stage/"; fi
done

# What is still missing, from the manifest (slice names, sizes, hashes).
read -r hash missing < <("$python" - "$stage" <<'EOF'
import hashlib, json, pathlib, sys
stage = pathlib.Path(sys.argv[1])
manifest = json.loads((stage / "MANIFEST").read_text())
missing = [s["name"] for s in manifest["slices"] if not (stage / s["name"]).exists()]
for s in manifest["slices"]:
    path = stage / s["name"]
    if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() != s["sha256"]:
        sys.exit(f"install.sh: {path} does not match its manifest hash")
print(manifest["hash"], ",".join(missing) or "-")
EOF
)
if [[ $missing != - ]]; then
  echo "install.sh: bundle $hash: waiting for ${missing} (have $(find "$stage" -name 'bundle.tar.xz.*' | wc -l))"
  exit 0
fi
if [[ -f $site/.bundle && $(cat "$site/.bundle") == "$hash" ]]; then
  echo "install.sh: bundle $hash already unpacked in $site and $upstream"
else
  echo "install.sh: bundle $hash complete; unpacking"
  rm -rf "$site" "$upstream" "$stage/tree"
  mkdir -p "$stage/tree"
  cat "$stage"/bundle.tar.xz.* > "$stage/bundle.tar.xz"
  if command -v xz >/dev/null; then
    tar -xJf "$stage/bundle.tar.xz" -C "$stage/tree"
  else
    "$python" -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2], filter="data")' \
      "$stage/bundle.tar.xz" "$stage/tree"
  fi
  rm "$stage/bundle.tar.xz"
  mv "$stage/tree/site" "$site"
  mv "$stage/tree/upstream" "$upstream"
  echo "install.sh: unpacked in $((SECONDS - start)) s: $(du -sh "$site" | cut -f1) in $site, $(du -sh "$upstream" | cut -f1) in $upstream"
  t=$SECONDS
  "$python" -m compileall -q -j 0 "$site" "$upstream/deps" "$upstream/src/lmcache" >/dev/null || true
  echo "install.sh: byte-compiled in $((SECONDS - t)) s"
  t=$SECONDS
  PYTHONPATH=$site "$python" -c '
import vllm, vllm._C_stable_libtorch, vllm.vllm_flash_attn._vllm_fa3_C
import vllm.entrypoints.openai.api_server, valkey, zmq, xgrammar
print("install.sh: vllm", vllm.__version__, "imports")'
  echo "install.sh: vLLM's imports checked in $((SECONDS - t)) s"
  echo "$hash" > "$site/.bundle"
fi
echo "install.sh: ready in $((SECONDS - start)) s (upstream LMCache's ops: benchmarks/gpu/build_upstream.sh)"
