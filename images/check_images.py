"""Checks for images/*/Dockerfile where no Docker engine exists (`make images-check`).

Two checks per image. `lint`: the rules we care about, which hadolint does not enforce: a base
pinned to a version or digest (never `latest`), a non-root numeric USER in the final stage, and
no secrets baked into ENV/ARG. `install`: the Dockerfile's own install RUN, verbatim, against a
staged copy of exactly what its COPY lines bring in, in a clean environment standing in for the
base image; then a check that it added only the expected distributions.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "images"
PROJECT_VENV = REPO / ".venv"

SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY)", re.I)
SECRET_FILE = re.compile(r"(\.env\b|id_rsa|id_ed25519|\.pem\b|\.key\b|\.netrc\b)")
PINNED_TAG = re.compile(r"^v?\d+\.\d+\.\d+([-.+][A-Za-z0-9.-]+)?$")
# Directories a RUN may name that the check relocates into its scratch root.
IMAGE_DIRS = ("src", "opt")


class ImageError(RuntimeError):
    """A Dockerfile broke a rule or its install steps failed; names the file and line."""


@dataclass(frozen=True)
class Instruction:
    line: int
    op: str
    args: str


def shown(path: Path) -> Path:
    """A path as messages show it: relative to the repo when inside it."""
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def parse(dockerfile: Path) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and blank lines dropped."""
    out: list[Instruction] = []
    buf, start = "", 0
    for number, raw in enumerate(dockerfile.read_text().splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if not buf:
            start = number
        buf += " " + line.removesuffix("\\").strip()
        if not line.endswith("\\"):
            op, _, args = buf.strip().partition(" ")
            out.append(Instruction(start, op.upper(), args.strip()))
            buf = ""
    return out


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for ins in instructions:
        if ins.op == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def global_args(instructions: list[Instruction]) -> dict[str, str]:
    """`ARG NAME=default` lines before the first FROM: what a FROM line may refer to."""
    defaults: dict[str, str] = {}
    for ins in instructions:
        if ins.op == "FROM":
            break
        if ins.op == "ARG":
            name, _, default = ins.args.partition("=")
            defaults[name.strip()] = default.strip().strip('"')
    return defaults


def base_image(stage_from: Instruction, args: dict[str, str]) -> str:
    """The image a FROM line names, with `${ARG}`/`$ARG` replaced by the ARG's default (what a
    build without --build-arg uses, so that is what must be pinned)."""
    image = next(w for w in stage_from.args.split() if not w.startswith("--"))
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2]) or m[0], image)


def lint(dockerfile: Path) -> list[str]:
    """Our rules; each problem names `file:line` and what is allowed."""
    rel = shown(dockerfile)
    problems: list[str] = []
    names: set[str] = set()
    instructions = parse(dockerfile)
    args = global_args(instructions)
    all_stages = stages(instructions)
    for stage in all_stages:
        words = stage[0].args.split()
        image = base_image(stage[0], args)
        if "$" in image:
            problems.append(
                f"{rel}:{stage[0].line}: base {image} has no default: declare "
                "`ARG NAME=<pinned image>` before the first FROM"
            )
            continue
        if len(words) >= 3 and words[-2].upper() == "AS":
            names.add(words[-1].lower())
        if image.lower() in names:
            continue
        ref, _, digest = image.partition("@")
        tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else ""
        if digest:
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                problems.append(f"{rel}:{stage[0].line}: bad digest in {image}")
        elif not PINNED_TAG.match(tag):
            problems.append(
                f"{rel}:{stage[0].line}: base {image} is not pinned: use a version tag "
                "with major.minor.patch (3.12.12-slim) or @sha256:…, never latest or no tag"
            )
    if not all_stages:
        return [f"{rel}: no FROM"]
    users = [ins for ins in all_stages[-1] if ins.op == "USER"]
    if not users:
        problems.append(f"{rel}: the final stage has no USER: it would run as root")
    else:
        user = users[-1].args.split(":")[0]
        if not user.isdigit() or int(user) == 0:
            problems.append(
                f"{rel}:{users[-1].line}: USER {users[-1].args}: use a numeric non-zero UID, so "
                "`runAsNonRoot` can verify it"
            )
    for stage in all_stages:
        for ins in stage:
            if ins.op in ("ENV", "ARG"):
                for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", ins.args) or [ins.args]:
                    if SECRET_NAME.search(name):
                        problems.append(
                            f"{rel}:{ins.line}: {ins.op} {name} looks like a secret; secrets "
                            "come from Kubernetes Secrets at run time, never from the image"
                        )
            if ins.op in ("COPY", "ADD") and re.search(
                r"(\.env\b|id_rsa|\.pem\b|\.key\b)", ins.args
            ):
                problems.append(f"{rel}:{ins.line}: {ins.op} {ins.args} copies a secret file")
    return problems


# --- install steps ------------------------------------------------------------------------------


def relocate(text: str, root: Path) -> str:
    """`/src/...` and `/opt/...` of the image, under the scratch root instead."""
    dirs = "|".join(IMAGE_DIRS)
    return re.sub(rf"(?<![\w./-])/({dirs})(?=/|\s|$)", lambda m: f"{root}/{m[1]}", text)


def stage_context(instructions: list[Instruction], root: Path) -> None:
    """Replay the COPY lines that take files from the build context (not from other stages)."""
    for ins in instructions:
        if ins.op != "COPY" or "--from=" in ins.args:
            continue
        *sources, dest = shlex.split(ins.args)
        target = Path(relocate(dest, root))
        for source in sources:
            path = REPO / source
            if path.is_dir():
                shutil.copytree(path, target, dirs_exist_ok=True)
            elif path.exists() and dest.endswith("/"):
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / path.name)
            elif path.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
            else:
                raise ImageError(f"COPY {source} (line {ins.line}): not in the build context")


def install_runs(instructions: list[Instruction]) -> list[Instruction]:
    """The RUN lines that use the copied sources: the image's install steps."""
    return [
        ins for ins in instructions if ins.op == "RUN" and re.search(r"(?<![\w.])/src/", ins.args)
    ]


def site_packages(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def distributions(site: Path) -> set[str]:
    return {normalize(p.name.split("-")[0]) for p in site.glob("*.dist-info")}


@dataclass(frozen=True)
class Image:
    """How to stand in for one image's base, and what its install may add."""

    name: str
    prepare: Callable[[Path], tuple[dict[str, str], Path]]
    own_distribution: str
    replaces: frozenset[str] = frozenset()  # distributions of the base the install must remove

    @property
    def dockerfile(self) -> Path:
        return IMAGES / self.name / "Dockerfile"

    def expected(self) -> set[str]:
        """Exactly the locked requirements and our own package: anything else is a leak."""
        lock = (IMAGES / self.name / "requirements.txt").read_text()
        names = re.findall(r"^([A-Za-z0-9_.-]+)==", lock, re.MULTILINE)
        return {normalize(n) for n in names} | {self.own_distribution}


def python_312() -> str:
    """The operator image's Python is 3.12; use a local 3.12 when there is one."""
    return os.environ.get("IMAGE_PYTHON") or shutil.which("python3.12") or sys.executable


def prepare_operator(root: Path) -> tuple[dict[str, str], Path]:
    """python:3.12-slim: a plain Python on PATH as `python3`; the venv is created by the RUN."""
    bindir = root / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(python_312())
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    return env, root / "opt" / "operator"


def prepare_vllm(root: Path) -> tuple[dict[str, str], Path]:
    """vllm/vllm-openai: a clean venv that sees the project venv's vllm==0.25.0 and torch.

    The project venv installs the same pinned vLLM (the `vllm` extra), so it holds what the base
    image holds. Its packages come in read-only through a .pth entry, as a view without the
    distributions the image lacks (our lock and our own package), so the install must add them.
    Upstream `lmcache`, which the image bundles, goes into the venv itself, from PyPI.
    """
    project_python = PROJECT_VENV / "bin" / "python"
    if not project_python.exists():
        raise ImageError(f"{project_python} missing: run `make venv` (it installs vllm)")
    base = root / "base"
    subprocess.run([str(project_python), "-m", "venv", str(base)], check=True)
    upstream = IMAGES / "vllm-lmcache" / "upstream-lmcache.txt"
    pip = [str(base / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps"]
    pip += ["--disable-pip-version-check", "--only-binary=:all:", "-r", str(upstream)]
    proc = subprocess.run(pip, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ImageError(f"installing {shown(upstream)} into the stand-in base: {proc.stderr}")
    view = root / "vllm-image-site-packages"
    hidden = IMAGES_BY_NAME["vllm-lmcache"].expected()
    site_view(site_packages(project_python), view, hidden)
    (site_packages(base / "bin" / "python") / "vllm-image.pth").write_text(f"{view}\n")
    env = {**os.environ, "PATH": f"{base / 'bin'}:{os.environ['PATH']}", "PYTHONNOUSERSITE": "1"}
    return env, base


def site_view(site: Path, view: Path, hidden: set[str]) -> None:
    """Symlinks to every entry of `site` except the files of the `hidden` distributions."""
    skip: set[str] = set()
    for info in site.glob("*.dist-info"):
        if normalize(info.name.split("-")[0]) not in hidden:
            continue
        skip.add(info.name)
        record = info / "RECORD"
        if record.exists():
            skip |= {line.split("/")[0].split(",")[0] for line in record.read_text().splitlines()}
    view.mkdir()
    for entry in site.iterdir():
        if entry.name not in skip and not entry.name.endswith(".pth"):
            (view / entry.name).symlink_to(entry)


IMAGES_UNDER_TEST = (
    Image("operator", prepare_operator, "lmcache_kube_operator"),
    Image("vllm-lmcache", prepare_vllm, "lmcache_kube", replaces=frozenset({"lmcache"})),
)
IMAGES_BY_NAME = {image.name: image for image in IMAGES_UNDER_TEST}


def check_install(image: Image) -> list[str]:
    rel = shown(image.dockerfile)
    instructions = parse(image.dockerfile)
    runs = install_runs(instructions)
    if not runs:
        return [f"{rel}: no RUN uses /src: nothing to check"]
    with tempfile.TemporaryDirectory(prefix=f"images-check-{image.name}-") as tmp:
        root = Path(tmp)
        env, environment = image.prepare(root)
        python = environment / "bin" / "python"
        before = distributions(site_packages(python)) if python.exists() else set()
        stage_context(instructions, root)
        for run in runs:
            command = relocate(run.args, root)
            proc = subprocess.run(
                ["sh", "-c", command],
                env=env,
                cwd=root,
                text=True,
                capture_output=True,
                check=False,
            )
            if proc.returncode != 0:
                return [
                    f"{rel}:{run.line}: RUN failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
                ]
        after = distributions(site_packages(python))
    return check_changes(rel, image, before, after)


def check_changes(rel: Path, image: Image, before: set[str], after: set[str]) -> list[str]:
    """Exactly the expected distributions added, exactly those the install replaces removed."""
    problems = []
    if (added := after - before) != (expected := image.expected()):
        problems.append(
            f"{rel}: the install added {sorted(added)}; expected exactly {sorted(expected)}"
        )
    if not image.replaces <= before:
        problems.append(
            f"{rel}: the stand-in base lacks {sorted(image.replaces - before)}: nothing to replace"
        )
    if (removed := before - after) != image.replaces:
        problems.append(
            f"{rel}: the install removed {sorted(removed)}; expected exactly "
            f"{sorted(image.replaces)}"
        )
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=("lint", "install", "all"), nargs="?", default="all")
    parser.add_argument("--image", choices=[i.name for i in IMAGES_UNDER_TEST], action="append")
    args = parser.parse_args(argv)
    chosen = [i for i in IMAGES_UNDER_TEST if not args.image or i.name in args.image]
    problems: list[str] = []
    for image in chosen:
        found: list[str] = []
        try:
            if args.check in ("lint", "all"):
                found += lint(image.dockerfile)
            if args.check in ("install", "all"):
                found += check_install(image)
        except ImageError as e:
            found.append(f"{shown(image.dockerfile)}: {e}")
        print(f"images-check {args.check}: {image.name}: {'FAILED' if found else 'ok'}")
        problems += found
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
