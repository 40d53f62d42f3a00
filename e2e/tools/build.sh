#!/usr/bin/env bash
# Build the e2e tools from Go modules (release-binary downloads are not reachable here) into a
# cache keyed by <tool>-<version>, then link them into .e2e/bin. A cache hit skips the build.
#
# Why wrapper modules: `go install k8s.io/kubernetes/cmd/...@vX` (and etcd's server module) fail
# because their go.mod carries replace directives. A throwaway main module that requires the target
# module is allowed to build its packages; for Kubernetes it also replaces every k8s.io/<staging>
# module with its published v0.<minor>.<patch> tag, the list taken from the tag's own go.mod.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache="${E2E_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lmcache-kube/e2e-tools}"
bin="${E2E_BIN:-$repo/.e2e/bin}"
mkdir -p "$cache" "$bin"

export CGO_ENABLED=0 GOFLAGS=-mod=mod
proxy="${GOPROXY_URL:-https://proxy.golang.org}"

# Two `make e2e-tools` at once (two checkouts, two engineers) share the cache: take turns.
exec 9>"$cache/.lock"
flock 9

log() { printf '[e2e-tools %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# The pinned Go. A go >= 1.21 on PATH switches to it by itself (GOTOOLCHAIN: fetched from the module
# proxy and verified against the checksum database). Without one (Debian's golang-go is 1.19),
# fetch the same golang.org/toolchain module zip and check it against the pinned sha256.
# Only called when something must be built: a full cache hit needs no Go at all.
go_ready=0
ensure_go() {
  ((go_ready)) && return 0
  go_ready=1
  export GOTOOLCHAIN="go$GO_VERSION"
  local have oldest
  have=$(GOTOOLCHAIN=local go env GOVERSION 2>/dev/null || true)
  oldest=$(printf '%s\n' "${have#go}" 1.21 | sort -V | head -1)
  if [[ -n $have && $oldest == 1.21 ]]; then
    return 0
  fi
  local arch dir="$cache/go-$GO_VERSION" want zip
  arch=$(uname -m | sed 's/x86_64/amd64/; s/aarch64/arm64/')
  if [[ ! -x $dir/bin/go ]]; then
    want="GO_TOOLCHAIN_SHA256_LINUX_${arch^^}"
    [[ -n ${!want:-} ]] || { log "no Go >= 1.21 on PATH and no $want in versions.env"; exit 1; }
    zip="$dir.zip"
    log "fetching Go $GO_VERSION (golang.org/toolchain module) from $proxy"
    curl -fsSL -o "$zip" "$proxy/golang.org/toolchain/@v/v0.0.1-go$GO_VERSION.linux-$arch.zip"
    echo "${!want}  $zip" | sha256sum -c --quiet -
    python3 - "$zip" "$dir.tmp" <<'PY'
import os, sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(src) as z:
    for info in z.infolist():
        rel = info.filename.split("/", 2)[2]  # drop "golang.org/toolchain@v0.0.1-go…/"
        if not rel or info.is_dir():
            continue
        out = os.path.join(dst, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(info) as f, open(out, "wb") as g:
            g.write(f.read())
        os.chmod(out, (info.external_attr >> 16) & 0o777 or 0o644)
PY
    rm -rf "$dir" && mv "$dir.tmp" "$dir" && rm -f "$zip"
  fi
  export PATH="$dir/bin:$PATH" GOTOOLCHAIN=local
}

# have TOOL VERSION -> true when the cached binary exists
have() { [[ -x "$cache/$1-$2/$1" ]]; }

# wrapper_module DIR MODULE VERSION -> a main module in DIR requiring MODULE@VERSION
wrapper_module() {
  local dir=$1 module=$2 version=$3
  rm -rf "$dir" && mkdir -p "$dir"
  printf 'module lmcache-kube/e2e-tools/wrapper\n\ngo 1.26\n\nrequire %s %s\n' \
    "$module" "$version" >"$dir/go.mod"
}

# build_pairs DIR VERSION LDFLAGS TOOL=PACKAGE... : go build each package from the module in DIR
build_pairs() {
  local dir=$1 version=$2 ldflags=$3; shift 3
  local pair tool pkg tmp
  for pair in "$@"; do
    tool=${pair%%=*} pkg=${pair#*=}
    have "$tool" "$version" && continue
    log "building $tool $version ($pkg)"
    tmp="$cache/$tool-$version.tmp"
    rm -rf "$tmp" && mkdir -p "$tmp"
    (cd "$dir" && go build -trimpath -ldflags="-s -w $ldflags" -o "$tmp/$tool" "$pkg")
    rm -rf "$cache/$tool-$version" && mv "$tmp" "$cache/$tool-$version"
  done
}

build_kubernetes() {
  local v=$KUBERNETES_VERSION minor=${KUBERNETES_VERSION#v1.}
  local tools=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy)
  local t missing=0
  for t in "${tools[@]}"; do have "$t" "$v" || missing=1; done
  ((missing)) || return 0
  ensure_go
  local dir="$cache/.wrapper-kubernetes-$v"
  wrapper_module "$dir" k8s.io/kubernetes "$v"
  # Every staging replace of the tag's go.mod ("k8s.io/x => ./staging/src/k8s.io/x") becomes
  # "k8s.io/x => k8s.io/x v0.<minor>": the staging modules are published under that tag.
  curl -fsSL "$proxy/k8s.io/kubernetes/@v/$v.mod" |
    sed -nE "s#^[[:space:]]*(k8s\.io/[^[:space:]]+) => \./staging/src/.*#replace \1 => \1 v0.$minor#p" \
      >>"$dir/go.mod"
  grep -q '^replace k8s.io/api ' "$dir/go.mod" || { log "no staging replaces found for $v"; exit 1; }
  # What Kubernetes' own build stamps in (hack/lib/version.sh): without it every binary reports
  # v0.0.0-master, which kubectl refuses to parse and chart kubeVersion checks reject.
  local x ldflags="" major=${v#v} minor=${v#v1.}
  major=${major%%.*} minor=${minor%%.*}
  for x in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ldflags+=" -X $x.gitVersion=$v -X $x.gitMajor=$major -X $x.gitMinor=$minor"
    ldflags+=" -X $x.gitTreeState=clean"
  done
  build_pairs "$dir" "$v" "$ldflags" \
    kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver \
    kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
    kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler \
    kubectl=k8s.io/kubernetes/cmd/kubectl \
    kubelet=k8s.io/kubernetes/cmd/kubelet \
    kube-proxy=k8s.io/kubernetes/cmd/kube-proxy
}

build_module() {
  local module=$1 version=$2 name=$3 ldflags=$4; shift 4
  local pair missing=0
  for pair in "$@"; do have "${pair%%=*}" "$version" || missing=1; done
  ((missing)) || return 0
  ensure_go
  local dir="$cache/.wrapper-$name-$version"
  wrapper_module "$dir" "$module" "$version"
  build_pairs "$dir" "$version" "$ldflags" "$@"
}

# kwok has no built-in stages: the controller needs a config listing them. kwokctl's defaults
# (fast node initialize, lease heartbeat, fast pod ready/complete/delete) are taken from the pinned
# module so they always match the kwok binary.
kwok_stages() {
  local out="$cache/kwok-stages-$KWOK_VERSION/kwok-stages.yaml"
  [[ -s $out ]] && return 0
  ensure_go
  local src f dir="$cache/.wrapper-kwok-$KWOK_VERSION"
  [[ -f $dir/go.mod ]] || wrapper_module "$dir" sigs.k8s.io/kwok "$KWOK_VERSION"
  src=$(cd "$dir" && go mod download sigs.k8s.io/kwok && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)
  mkdir -p "$(dirname "$out")"
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
    pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    printf -- '---\n'
    cat "$src/kustomize/stage/$f"
  done >"$out.tmp"
  mv "$out.tmp" "$out"
}

start=$SECONDS
build_kubernetes
build_module go.etcd.io/etcd/server/v3 "$ETCD_VERSION" etcd "" etcd=go.etcd.io/etcd/server/v3
build_module sigs.k8s.io/kwok "$KWOK_VERSION" kwok "" \
  kwok=sigs.k8s.io/kwok/cmd/kwok kwokctl=sigs.k8s.io/kwok/cmd/kwokctl
# As helm's Makefile: its version, and the Kubernetes version `helm template` assumes offline.
helm_k8s_minor=${KUBERNETES_VERSION#v1.}
helm_k8s_minor=${helm_k8s_minor%%.*}
helm_ldflags="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
for x in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  helm_ldflags+=" -X $x.k8sVersionMajor=1 -X $x.k8sVersionMinor=$helm_k8s_minor"
done
build_module helm.sh/helm/v3 "$HELM_VERSION" helm "$helm_ldflags" helm=helm.sh/helm/v3/cmd/helm
# Cluster DNS for the real node (e2e/node.py): CoreDNS's go.mod has no replaces, the wrapper only
# pins the version.
build_module github.com/coredns/coredns "$COREDNS_VERSION" coredns "" coredns=github.com/coredns/coredns
kwok_stages

link() { ln -sfn "$cache/$1-$2/$1" "$bin/$1"; }
for t in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do link "$t" "$KUBERNETES_VERSION"; done
link etcd "$ETCD_VERSION"
link kwok "$KWOK_VERSION"
link kwokctl "$KWOK_VERSION"
link helm "$HELM_VERSION"
link coredns "$COREDNS_VERSION"
ln -sfn "$cache/kwok-stages-$KWOK_VERSION/kwok-stages.yaml" "$bin/kwok-stages.yaml"
log "tools ready in $bin ($((SECONDS - start)) s)"
