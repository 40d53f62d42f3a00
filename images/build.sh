#!/usr/bin/env bash
# One front end for whichever image builder the machine has: docker (with a running daemon),
# podman or buildah, in that order; IMAGE_BUILDER=docker|podman|buildah picks one.
#
#   images/build.sh build -f DOCKERFILE -t TAG [--build-arg K=V]... CONTEXT
#   images/build.sh exists TAG     exit 0 when the builder's local store holds TAG
#   images/build.sh save TAG       TAG as a docker-archive on stdout (what `ctr images import` reads)
#   images/build.sh load FILE      a docker-archive into the builder's local store
#   images/build.sh prune REF      remove the other tags of REF's repository from the local store
#   images/build.sh which          the builder's name
#
# Builds use the host network: RUN steps reach the package registries without a bridge, NAT
# rules or a CNI config of their own.
set -euo pipefail

pick() {
  if [[ -n ${IMAGE_BUILDER:-} ]]; then
    command -v "$IMAGE_BUILDER" >/dev/null || { echo "images/build.sh: IMAGE_BUILDER=$IMAGE_BUILDER not found" >&2; exit 1; }
    echo "$IMAGE_BUILDER"
  elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    echo docker
  elif command -v podman >/dev/null; then
    echo podman
  elif command -v buildah >/dev/null; then
    echo buildah
  else
    echo "images/build.sh: no image builder: install docker (with its daemon), podman or buildah" >&2
    exit 1
  fi
}

builder=$(pick)
cmd=${1:-}
shift || true
case $cmd in
  build)
    case $builder in
      buildah) exec buildah bud --layers --network=host "$@" ;;
      *) exec "$builder" build --network=host "$@" ;;
    esac
    ;;
  exists)
    case $builder in
      buildah) buildah inspect --type image "$1" >/dev/null 2>&1 ;;
      *) "$builder" image inspect "$1" >/dev/null 2>&1 ;;
    esac
    ;;
  save)
    case $builder in
      buildah) exec buildah push --quiet "$1" docker-archive:/dev/stdout:"$1" ;;
      podman) exec podman save --quiet --format docker-archive "$1" ;;
      docker) exec docker save "$1" ;;
    esac
    ;;
  load)
    case $builder in
      buildah) exec buildah pull --quiet docker-archive:"$1" ;;
      *) exec "$builder" load --quiet --input "$1" ;;
    esac
    ;;
  prune)
    repo=${1%:*}
    case $builder in
      buildah) format='{{.Name}}:{{.Tag}}' ;;
      *) format='{{.Repository}}:{{.Tag}}' ;;
    esac
    for old in $("$builder" images --format "$format" "$repo"); do
      [[ $old == "$1" ]] || "$builder" rmi "$old" >/dev/null
    done
    ;;
  which) echo "$builder" ;;
  *)
    echo "usage: images/build.sh build|exists|save|load|prune|which ..." >&2
    exit 2
    ;;
esac
