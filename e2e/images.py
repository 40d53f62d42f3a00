"""The images the real node runs (e2e/node.py), built here: no registry is reachable, so neither
the official bases nor our published images can be pulled.

The chain, each link a Dockerfile built with images/build.sh (docker, podman or buildah):

    debian        Debian bookworm (mmdebstrap: python3, python3-venv) + the host's CA bundle
    pause         the pod sandbox image: debian's layer, `sleep infinity`
    python        debian + a venv on PATH: stands in for python:3.12-slim
    valkey        debian + Debian's redis-server as valkey-server/valkey-cli
    operator      images/operator/Dockerfile with BASE=python, unchanged
    vllm-base     python + vllm==0.25.0 and torch from PyPI + upstream lmcache: stands in for
                  vllm/vllm-openai:v0.25.0
    vllm-lmcache  images/vllm-lmcache/Dockerfile with BASE=vllm-base, unchanged
    engine        vllm-lmcache + the `vllm serve` stand-in (e2e/standin/)

Every image is tagged `localhost/lmcache-e2e/<name>:<content hash>`: the hash covers its
Dockerfile's instructions, every file its COPY/ADD lines bring in (what git lists under those
paths, as they are in the working tree), its build arguments and its base's hash. A tag already
in the builder's store is not rebuilt, and older tags of the same image are removed. With
E2E_IMAGES_ARCHIVE=1, vllm-base (torch and vLLM: 5.8 GB, the slowest part) is also kept as a
docker-archive in the cache directory, so a CI that restores that directory builds it once per
change of its recipe (off by default: 5.8 GB more on disk). Usage: `python -m e2e.images
[--print]` builds what is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from images.check_images import parse

REPO = Path(__file__).resolve().parent.parent
E2E_DIR = Path(os.environ.get("E2E_DIR", REPO / ".e2e"))
DOCKERFILES = REPO / "e2e" / "images"
BUILD = REPO / "images" / "build.sh"
REGISTRY = "localhost/lmcache-e2e"
CACHE = Path(
    os.environ.get(
        "E2E_IMAGES_CACHE",
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmcache-kube/e2e-images",
    )
)
LOGS = E2E_DIR / "images"

# The Debian rootfs every image starts from; a change here is a new cache key.
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "python3-venv")
# pip inside the builds must trust what the host trusts (a TLS-inspecting proxy's CA included).
HOST_CA_BUNDLE = Path(
    os.environ.get("SSL_CERT_FILE")
    or os.environ.get("PIP_CERT")
    or "/etc/ssl/certs/ca-certificates.crt"
)


class ImageError(RuntimeError):
    """An image could not be built or exported; names the image and its build log."""


@dataclass(frozen=True)
class Image:
    """One link of the chain: its Dockerfile, the image it builds on, and its generated inputs."""

    name: str
    dockerfile: Path
    base: str | None = None
    # Context files made at build time (not in the repository): name -> what decides its content.
    generated: dict[str, str] = field(default_factory=dict)
    archive: bool = False  # also keep a docker-archive in CACHE (with E2E_IMAGES_ARCHIVE=1)


def _rootfs_recipe() -> str:
    return f"mmdebstrap --variant=minbase --include={','.join(DEBIAN_PACKAGES)} {DEBIAN_SUITE}"


IMAGES = {
    image.name: image
    for image in (
        Image(
            "debian",
            DOCKERFILES / "debian/Dockerfile",
            generated={"rootfs.tar": _rootfs_recipe(), "ca-certificates.crt": "host CA bundle"},
        ),
        Image("pause", DOCKERFILES / "pause/Dockerfile", "debian"),
        Image("python", DOCKERFILES / "python/Dockerfile", "debian"),
        Image("valkey", DOCKERFILES / "valkey/Dockerfile", "debian"),
        Image("operator", REPO / "images/operator/Dockerfile", "python"),
        Image("vllm-base", DOCKERFILES / "vllm-base/Dockerfile", "python", archive=True),
        Image("vllm-lmcache", REPO / "images/vllm-lmcache/Dockerfile", "vllm-base"),
        Image("engine", DOCKERFILES / "engine/Dockerfile", "vllm-lmcache"),
    )
}
# What the node's containerd needs: the sandbox image and what the tests' pods run.
NODE_IMAGES = ("pause", "valkey", "operator", "engine")


def log(message: str) -> None:
    print(f"[e2e-images {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- what an image is made of -------------------------------------------------------------------


def copy_sources(dockerfile: Path) -> list[str]:
    """The build-context paths of the Dockerfile's COPY/ADD lines (not those from other stages)."""
    sources: list[str] = []
    for ins in parse(dockerfile):
        words = shlex.split(ins.args)
        if ins.op in ("COPY", "ADD") and not any(w.startswith("--from=") for w in words):
            sources += [w for w in words if not w.startswith("--")][:-1]
    return sources


def context_files(dockerfile: Path, generated: dict[str, str]) -> list[str]:
    """Repository files the build sees: what git lists (tracked, or untracked and not ignored)
    under the COPY/ADD sources, so caches and editor files never change a hash."""
    paths = [s.rstrip("/") for s in copy_sources(dockerfile) if s.rstrip("/") not in generated]
    if not paths:
        return []
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z", "--", *paths],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    files = sorted({f for f in out.split("\0") if f and (REPO / f).is_file()})
    missing = [p for p in paths if not any(f == p or f.startswith(p + "/") for f in files)]
    if missing:
        raise ImageError(f"{dockerfile}: COPY sources not in the repository: {missing}")
    return files


def digest(name: str, refs: dict[str, str]) -> str:
    """The content hash of an image: Dockerfile, context files, generated inputs, base."""
    image = IMAGES[name]
    h = hashlib.sha256()
    # The instructions, not the bytes: a comment edit rebuilds nothing.
    h.update("\n".join(f"{i.op} {i.args}" for i in parse(image.dockerfile)).encode())
    for rel in context_files(image.dockerfile, image.generated):
        path = REPO / rel
        h.update(f"\0{rel}\0{os.access(path, os.X_OK)}\0".encode())
        h.update(path.read_bytes())
    for gen, recipe in sorted(image.generated.items()):
        h.update(f"\0{gen}\0{recipe}\0".encode())
        if gen == "ca-certificates.crt":
            h.update(HOST_CA_BUNDLE.read_bytes())
    if image.base:
        h.update(f"\0BASE={refs[image.base]}".encode())
    return h.hexdigest()[:16]


def plan() -> dict[str, str]:
    """Every image's tag, computed from its inputs alone (nothing is built)."""
    refs: dict[str, str] = {}
    for name in IMAGES:  # bases come first in IMAGES
        refs[name] = f"{REGISTRY}/{name}:{digest(name, refs)}"
    return refs


# --- building -----------------------------------------------------------------------------------


def builder(*args: str, stdout: int | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(BUILD), *args], stdout=stdout, stderr=subprocess.PIPE, check=False)


def exists(ref: str) -> bool:
    return builder("exists", ref).returncode == 0


def rootfs_path() -> Path:
    key = hashlib.sha256(_rootfs_recipe().encode()).hexdigest()[:16]
    return CACHE / f"rootfs-{key}.tar"


def rootfs() -> Path:
    """The Debian rootfs tar, made once per recipe (about a minute) and kept in CACHE."""
    tar = rootfs_path()
    if tar.exists():
        return tar
    if shutil.which("mmdebstrap") is None:
        raise ImageError("mmdebstrap is missing (apt-get install mmdebstrap)")
    CACHE.mkdir(parents=True, exist_ok=True)
    log(f"bootstrapping the Debian rootfs: {_rootfs_recipe()}")
    tmp = tar.with_suffix(".tmp")
    cmd = ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(DEBIAN_PACKAGES)}"]
    run_logged("rootfs", [*cmd, DEBIAN_SUITE, str(tmp)])
    tmp.rename(tar)
    return tar


def run_logged(name: str, cmd: list[str]) -> None:
    LOGS.mkdir(parents=True, exist_ok=True)
    path = LOGS / f"{name}.log"
    with open(path, "ab") as out:
        out.write(f"\n--- {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = "\n".join(path.read_text(errors="replace").splitlines()[-25:])
        raise ImageError(f"{name}: `{' '.join(cmd[:3])} …` failed; {path}:\n{tail}")


@contextmanager
def staged_context(image: Image) -> Iterator[Path]:
    """A build context holding exactly the hashed files (and the generated ones)."""
    with tempfile.TemporaryDirectory(prefix=f"e2e-image-{image.name}-") as tmp:
        ctx = Path(tmp)
        for rel in context_files(image.dockerfile, image.generated):
            (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, ctx / rel)
        if "rootfs.tar" in image.generated:
            shutil.copyfile(rootfs(), ctx / "rootfs.tar")
        if "ca-certificates.crt" in image.generated:
            shutil.copyfile(HOST_CA_BUNDLE, ctx / "ca-certificates.crt")
        yield ctx


def ensure(name: str, refs: dict[str, str]) -> str:
    """The image in the builder's store: present, loaded from CACHE, or built (bases first)."""
    image, ref = IMAGES[name], refs[name]
    if exists(ref):
        return ref
    archive = CACHE / f"{name}-{ref.rsplit(':', 1)[1]}.tar"
    keep = image.archive and os.environ.get("E2E_IMAGES_ARCHIVE") == "1"
    if keep and archive.exists():
        log(f"loading {ref} from {archive}")
        run_logged(name, [str(BUILD), "load", str(archive)])
        return ref
    if image.base:
        ensure(image.base, refs)
    started = time.monotonic()
    log(f"building {ref} ({image.dockerfile.relative_to(REPO)}; log {LOGS / name}.log)")
    args = ["build", "-f", str(image.dockerfile), "-t", ref]
    if image.base:
        args += ["--build-arg", f"BASE={refs[image.base]}"]
    with staged_context(image) as ctx:
        run_logged(name, [str(BUILD), *args, str(ctx)])
    log(f"built {ref} in {time.monotonic() - started:.0f} s")
    builder("prune", ref)  # earlier builds of this image: gigabytes for the engine chain
    if keep:
        save_archive(ref, archive)
    return ref


def save_archive(ref: str, archive: Path) -> None:
    """Keep the image as a docker-archive; older archives of the same image are dropped."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        proc = builder("save", ref, stdout=out.fileno())
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ImageError(f"saving {ref}: {proc.stderr.decode(errors='replace')}")
    for old in CACHE.glob(archive.name.rsplit("-", 1)[0] + "-*.tar"):
        old.unlink()
    tmp.rename(archive)


def ensure_all(names: tuple[str, ...] = NODE_IMAGES) -> dict[str, str]:
    """Build what is missing of `names` (and their bases); return every image's tag."""
    refs = plan()
    for name in names:
        ensure(name, refs)
    return refs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the tags, build nothing")
    args = parser.parse_args(argv)
    try:
        refs = plan() if args.print else ensure_all()
    except (ImageError, subprocess.CalledProcessError) as e:
        print(f"e2e images: {e}", file=sys.stderr)
        return 1
    print(json.dumps(refs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
