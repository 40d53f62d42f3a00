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

export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod
ldflags="-s -w"

log() { printf '[e2e-tools %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# have TOOL VERSION -> true when the cached binary exists
have() { [[ -x "$cache/$1-$2/$1" ]]; }

# wrapper_module DIR MODULE VERSION -> a main module in DIR requiring MODULE@VERSION
wrapper_module() {
  local dir=$1 module=$2 version=$3
  rm -rf "$dir" && mkdir -p "$dir"
  printf 'module lmcache-kube/e2e-tools/wrapper\n\ngo 1.26\n\nrequire %s %s\n' \
    "$module" "$version" >"$dir/go.mod"
}

# build_into DIR TOOL... : go build every PACKAGE named by "tool=package" pairs from module dir DIR
build_pairs() {
  local dir=$1 version=$2; shift 2
  local pair tool pkg tmp
  for pair in "$@"; do
    tool=${pair%%=*} pkg=${pair#*=}
    have "$tool" "$version" && continue
    log "building $tool $version ($pkg)"
    tmp="$cache/$tool-$version.tmp"
    rm -rf "$tmp" && mkdir -p "$tmp"
    (cd "$dir" && go build -trimpath -ldflags="$ldflags" -o "$tmp/$tool" "$pkg")
    rm -rf "$cache/$tool-$version" && mv "$tmp" "$cache/$tool-$version"
  done
}

build_kubernetes() {
  local v=$KUBERNETES_VERSION minor=${KUBERNETES_VERSION#v1.}
  local tools=(kube-apiserver kube-controller-manager kube-scheduler kubectl) t missing=0
  for t in "${tools[@]}"; do have "$t" "$v" || missing=1; done
  ((missing)) || return 0
  local dir="$cache/.wrapper-kubernetes-$v"
  wrapper_module "$dir" k8s.io/kubernetes "$v"
  # Every staging replace of the tag's go.mod ("k8s.io/x => ./staging/src/k8s.io/x") becomes
  # "k8s.io/x => k8s.io/x v0.<minor>": the staging modules are published under that tag.
  curl -fsSL "${GOPROXY_URL:-https://proxy.golang.org}/k8s.io/kubernetes/@v/$v.mod" |
    sed -nE "s#^[[:space:]]*(k8s\.io/[^[:space:]]+) => \./staging/src/.*#replace \1 => \1 v0.$minor#p" \
      >>"$dir/go.mod"
  grep -q '^replace k8s.io/api ' "$dir/go.mod" || { log "no staging replaces found for $v"; exit 1; }
  build_pairs "$dir" "$v" \
    kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver \
    kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
    kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler \
    kubectl=k8s.io/kubernetes/cmd/kubectl
}

build_module() {
  local module=$1 version=$2 name=$3; shift 3
  local pair missing=0
  for pair in "$@"; do have "${pair%%=*}" "$version" || missing=1; done
  ((missing)) || return 0
  local dir="$cache/.wrapper-$name-$version"
  wrapper_module "$dir" "$module" "$version"
  build_pairs "$dir" "$version" "$@"
}

# kwok has no built-in stages: the controller needs a config listing them. kwokctl's defaults
# (fast node initialize, lease heartbeat, fast pod ready/complete/delete) are taken from the pinned
# module so they always match the kwok binary.
kwok_stages() {
  local out="$cache/kwok-stages-$KWOK_VERSION/kwok-stages.yaml"
  [[ -s $out ]] && return 0
  local src f
  src=$(cd "$cache/.wrapper-kwok-$KWOK_VERSION" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)
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
build_module go.etcd.io/etcd/server/v3 "$ETCD_VERSION" etcd etcd=go.etcd.io/etcd/server/v3
build_module sigs.k8s.io/kwok "$KWOK_VERSION" kwok \
  kwok=sigs.k8s.io/kwok/cmd/kwok kwokctl=sigs.k8s.io/kwok/cmd/kwokctl
build_module helm.sh/helm/v3 "$HELM_VERSION" helm helm=helm.sh/helm/v3/cmd/helm
kwok_stages

link() { ln -sfn "$cache/$1-$2/$1" "$bin/$1"; }
for t in kube-apiserver kube-controller-manager kube-scheduler kubectl; do link "$t" "$KUBERNETES_VERSION"; done
link etcd "$ETCD_VERSION"
link kwok "$KWOK_VERSION"
link kwokctl "$KWOK_VERSION"
link helm "$HELM_VERSION"
ln -sfn "$cache/kwok-stages-$KWOK_VERSION/kwok-stages.yaml" "$bin/kwok-stages.yaml"
log "tools ready in $bin ($((SECONDS - start)) s)"
