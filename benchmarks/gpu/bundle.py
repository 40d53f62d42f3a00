"""Download what the GPU machine lacks for ``bench_serve.py``, cut into parts of one call each.

The GPU machine has no network and a call carries at most 64 MiB with the working tree, so the
packages travel as slices of one xz tar, a part folder per call (``OUT/part1``, ``OUT/part2``...,
each <= 56 MiB with the ``MANIFEST`` every part repeats). ``install.sh PARTDIR`` there collects them
and unpacks once all have arrived. The tar holds, ready to put on ``PYTHONPATH``:

* ``site/`` -> ``/tmp/site``: ``site.txt``'s wheels (CPython 3.12, x86-64), trimmed of what a
  dense model on a Hopper GPU never loads (FlashAttention 2, the MoE kernels, the Rust frontend,
  JIT headers, other Pythons' builds, a static library);
* ``upstream/src`` -> ``/tmp/site-upstream/src``: upstream LMCache's sdist, to build its ops there;
* ``upstream/deps``, ``upstream/build``: ``upstream.txt``'s wheels, at run time and build time.

Pre-installing here (``pip install --target`` for the machine's platform) instead of carrying the
wheels lets xz compress the libraries themselves: vLLM's FlashAttention 3 library is 37 MB as a
wheel member and 11 MB in the tar. Downloads are cached under ``OUT/cache``; the parts are rebuilt
only when ``site.txt``, ``upstream.txt`` or this script change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
PART_BYTES = 56 << 20  # leaves 8 MiB of a call for the working tree
PYTHON_VERSION = "3.12"
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(5, 40)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
]
TRIM = [
    "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so",  # FlashAttention 2: pre-Hopper GPUs
    "vllm/_moe_C_stable_libtorch.abi3.so",  # MoE kernels (an optional import; Llama is dense)
    "vllm/vllm-rs",  # Rust frontend, used only with VLLM_RUST_FRONTEND_PATH
    "vllm/third_party/deep_gemm/include",  # headers of kernels compiled at run time
    "vllm/third_party/fmha_sm100/cutlass",  # headers of Blackwell attention kernels
    "vllm/third_party/deep_gemm/_C.cpython-310-x86_64-linux-gnu.so",
    "vllm/third_party/deep_gemm/_C.cpython-311-x86_64-linux-gnu.so",
    "vllm/third_party/deep_gemm/_C.cpython-313-x86_64-linux-gnu.so",
    "vllm/third_party/deep_gemm/_C.cpython-314-x86_64-linux-gnu.so",
    "xgrammar/lib/libxgrammar.a",  # static library for C++ users
]
# What setup.py's build_ext needs of the sdist (its README is read by the pyproject metadata).
SDIST_KEEP = (
    "lmcache/",
    "csrc/",
    "setup_extensions/",
    "requirements/",
    "setup.py",
    "pyproject.toml",
    "PKG-INFO",
    "README.md",
    "LICENSE",
    "MANIFEST.in",
    "CMakeLists.txt",
)


def requirements(path: Path) -> tuple[list[str], list[str], list[str]]:
    """(runtime pins, build pins, sdist URLs) of a list file: ``build:`` lines are build pins."""
    runtime, build, urls = [], [], []
    for raw in path.read_text().splitlines():
        url = raw.strip().startswith(("https://", "http://"))
        line = raw.strip() if url else raw.split("#", 1)[0].strip()
        if not line:
            continue
        if url:
            urls.append(line)
        elif line.startswith("build:"):
            build.append(line.removeprefix("build:").strip())
        else:
            runtime.append(line)
    return runtime, build, urls


def inputs_hash() -> str:
    digest = hashlib.sha256()
    for name in ("site.txt", "upstream.txt", "bundle.py"):
        digest.update((HERE / name).read_bytes())
    return digest.hexdigest()[:16]


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def target_flags() -> list[str]:
    flags = ["--python-version", PYTHON_VERSION, "--implementation", "cp", "--only-binary=:all:"]
    for platform in PLATFORMS:
        flags += ["--platform", platform]
    return flags


def wheels(pins: list[str], cache: Path) -> list[Path]:
    """Download ``pins`` for the GPU machine (cached) and return their wheel files."""
    if not pins:
        return []
    cache.mkdir(parents=True, exist_ok=True)
    pip("download", "-q", "--no-deps", "-d", str(cache), *target_flags(), *pins)
    found = []
    for pin in pins:
        name, _, version = pin.partition("==")
        stem = f"{name.replace('-', '_').lower()}-{version}-"
        matches = [w for w in cache.glob("*.whl") if w.name.lower().startswith(stem)]
        if len(matches) != 1:
            raise SystemExit(f"{pin}: expected one wheel in {cache}, found {matches}")
        found.append(matches[0])
    return found


def install(files: list[Path], target: Path) -> None:
    if files:
        pip("install", "-q", "--no-deps", "--no-compile", "--target", str(target), *target_flags(),
            *map(str, files))  # fmt: skip


def sdist(url: str, cache: Path) -> Path:
    """Download a ``URL#sha256=...`` file once and check its hash."""
    link, _, fragment = url.partition("#sha256=")
    path = cache / link.rsplit("/", 1)[1]
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(link, timeout=120) as response:
            path.with_suffix(".part").write_bytes(response.read())
        path.with_suffix(".part").replace(path)
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != fragment:
        path.unlink()
        raise SystemExit(f"{link}: sha256 {actual}, expected {fragment} (file removed)")
    return path


def unpack_sdist(archive: Path, target: Path) -> None:
    """The members of the sdist that its extension build needs, under ``target``."""
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            _, _, inner = member.name.partition("/")
            if inner.startswith(SDIST_KEEP) and (member.isfile() or member.isdir()):
                member.name = inner
                members.append(member)
        tar.extractall(target, members=members, filter="data")


def trim(site: Path) -> int:
    """Remove ``TRIM`` and caches from an installed tree; returns the bytes removed."""
    removed = 0
    for relative in TRIM:
        path = site / relative
        if not path.exists():
            raise SystemExit(f"trim list out of date: {relative} is not in the installed tree")
        if path.is_dir():
            removed += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            shutil.rmtree(path)
        else:
            removed += path.stat().st_size
            path.unlink()
    for cache in site.rglob("__pycache__"):
        shutil.rmtree(cache)
    return removed


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def pack(stage: Path, archive: Path) -> None:
    """xz tar of ``stage`` with the system's tar and multi-threaded xz."""
    with archive.open("wb") as out:
        tar = subprocess.Popen(["tar", "-C", str(stage), "-cf", "-", "."], stdout=subprocess.PIPE)
        subprocess.run(["xz", "-T0", "-6", "-c"], stdin=tar.stdout, stdout=out, check=True)
        if tar.wait() != 0:
            raise SystemExit("tar failed")


def split(archive: Path, out: Path, stamp: str) -> list[Path]:
    """Cut ``archive`` into ``out/partK/bundle.tar.xz.K`` slices, each part with the manifest."""
    for old in out.glob("part*"):
        shutil.rmtree(old)
    data = archive.read_bytes()
    slices = [data[i : i + PART_BYTES] for i in range(0, len(data), PART_BYTES)]
    manifest = {
        "hash": stamp,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "slices": [
            {"name": f"bundle.tar.xz.{k}", "bytes": len(s), "sha256": hashlib.sha256(s).hexdigest()}
            for k, s in enumerate(slices, 1)
        ],
    }
    parts = []
    for k, piece in enumerate(slices, 1):
        part = out / f"part{k}"
        part.mkdir(parents=True)
        (part / f"bundle.tar.xz.{k}").write_bytes(piece)
        (part / "MANIFEST").write_text(json.dumps(manifest, indent=2) + "\n")
        parts.append(part)
    return parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".gpu"))
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if the inputs did not change"
    )
    args = parser.parse_args()
    out: Path = args.out
    stamp = inputs_hash()
    if not args.force and (out / "STAMP").exists() and (out / "STAMP").read_text() == stamp:
        print(f"{out}: parts up to date ({stamp}):")
        for part in sorted(out.glob("part*")):
            print(f"  {part}: {sum(f.stat().st_size for f in part.iterdir()) / 2**20:.1f} MiB")
        return 0
    started = time.monotonic()
    site_pins, _, _ = requirements(HERE / "site.txt")
    upstream_pins, build_pins, urls = requirements(HERE / "upstream.txt")
    if len(urls) != 1:
        raise SystemExit(f"upstream.txt: expected one sdist URL, found {len(urls)}")
    cache = out / "cache"
    stage = out / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    install(wheels(site_pins, cache / "wheels"), stage / "site")
    install(wheels(upstream_pins, cache / "wheels"), stage / "upstream" / "deps")
    install(wheels(build_pins, cache / "wheels"), stage / "upstream" / "build")
    unpack_sdist(sdist(urls[0], cache / "sdist"), stage / "upstream" / "src")
    installed = tree_bytes(stage / "site")
    removed = trim(stage / "site")
    (stage / "BUNDLE.json").write_text(
        json.dumps({"hash": stamp, "site": site_pins, "upstream": [*upstream_pins, *urls]}) + "\n"
    )
    print(f"site: {installed / 2**20:.0f} MiB installed, {removed / 2**20:.0f} MiB trimmed")
    print(f"upstream: {tree_bytes(stage / 'upstream') / 2**20:.0f} MiB")
    archive = cache / "bundle.tar.xz"
    pack(stage, archive)
    parts = split(archive, out, stamp)
    shutil.rmtree(stage)
    (out / "STAMP").write_text(stamp)
    print(f"{archive}: {archive.stat().st_size / 2**20:.1f} MiB in {len(parts)} parts "
          f"({time.monotonic() - started:.0f} s):")  # fmt: skip
    for part in parts:
        print(f"  {part}: {sum(f.stat().st_size for f in part.iterdir()) / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
