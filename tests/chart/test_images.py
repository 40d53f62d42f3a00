"""images/check_images.py: the Dockerfile rules catch what they claim to, and the install-step
staging runs the Dockerfile's own lines. (The installs themselves run in `make images-check`.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "images"))

import check_images

GOOD = """\
# syntax=docker/dockerfile:1
FROM docker.io/library/python:3.12.12-slim-bookworm AS build
RUN echo build
FROM docker.io/library/python:3.12.12-slim-bookworm
COPY --from=build /opt /opt
USER 65532:65532
"""


def lint(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "Dockerfile"
    path.write_text(text)
    return check_images.lint(path)


def test_the_repo_dockerfiles_pass() -> None:
    for image in check_images.IMAGES_UNDER_TEST:
        assert check_images.lint(image.dockerfile) == []


def test_a_good_dockerfile_passes(tmp_path: Path) -> None:
    assert lint(tmp_path, GOOD) == []


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("python:3.12.12-slim-bookworm AS", "python:latest AS", "is not pinned"),
        ("python:3.12.12-slim-bookworm AS", "python AS", "is not pinned"),
        ("python:3.12.12-slim-bookworm\n", "python:3.12-slim\n", "is not pinned"),
        ("python:3.12.12-slim-bookworm\n", "python@sha256:abc\n", "bad digest"),
        ("USER 65532:65532\n", "", "no USER"),
        ("USER 65532:65532", "USER root", "numeric non-zero UID"),
        ("USER 65532:65532", "USER 0", "numeric non-zero UID"),
        ("USER 65532:65532", "ENV HF_TOKEN=hf_abc\nUSER 65532", "looks like a secret"),
        ("USER 65532:65532", "ARG DB_PASSWORD\nUSER 65532", "looks like a secret"),
        ("USER 65532:65532", "COPY id_rsa /root/.ssh/\nUSER 65532", "copies a secret file"),
    ],
)
def test_a_broken_rule_is_named_with_its_line(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    assert old in GOOD
    problems = lint(tmp_path, GOOD.replace(old, new, 1))
    assert len(problems) == 1 and message in problems[0], problems


def test_a_digest_pins_the_base(tmp_path: Path) -> None:
    pinned = GOOD.replace("python:3.12.12-slim-bookworm\n", "python@sha256:" + "a" * 64 + "\n")
    assert lint(tmp_path, pinned) == []


def test_continuation_lines_are_one_instruction(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text("FROM x:1.0\nRUN a \\\n    b\nUSER 1\n")
    ops = [(i.op, i.args, i.line) for i in check_images.parse(path)]
    assert ops == [("FROM", "x:1.0", 1), ("RUN", "a b", 2), ("USER", "1", 4)]


def test_install_steps_are_the_dockerfile_runs_relocated(tmp_path: Path) -> None:
    dockerfile = check_images.IMAGES_BY_NAME["operator"].dockerfile
    instructions = check_images.parse(dockerfile)
    (run,) = check_images.install_runs(instructions)
    assert run.args == "/src/images/operator/install.sh /src /opt/operator"
    assert check_images.relocate(run.args, tmp_path) == (
        f"{tmp_path}/src/images/operator/install.sh {tmp_path}/src {tmp_path}/opt/operator"
    )
    check_images.stage_context(instructions, tmp_path)
    assert (tmp_path / "src/images/operator/install.sh").is_file()
    assert (tmp_path / "src/operator/pyproject.toml").is_file()


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("ARG BASE=docker.io/library/python:3.12.12-slim-bookworm\n", None),
        ('ARG BASE="docker.io/library/python:3.12.12-slim-bookworm"\n', None),
        ("ARG BASE=docker.io/library/python:3.12-slim\n", "is not pinned"),
        ("ARG BASE\n", "has no default"),
        ("", "has no default"),
    ],
)
def test_a_base_build_argument_is_checked_through_its_default(
    tmp_path: Path, header: str, message: str | None
) -> None:
    text = header + GOOD.replace("docker.io/library/python:3.12.12-slim-bookworm", "${BASE}")
    problems = lint(tmp_path, text.replace("# syntax=docker/dockerfile:1\n", ""))
    if message is None:
        assert problems == []
    else:
        assert len(problems) == 2 and all(message in p for p in problems), problems


def test_the_vllm_install_must_replace_the_bundled_lmcache() -> None:
    image = check_images.IMAGES_BY_NAME["vllm-lmcache"]
    rel = Path("Dockerfile")
    base = {"torch", "vllm", "lmcache"}
    good = (base - {"lmcache"}) | image.expected()
    assert check_images.check_changes(rel, image, base, good) == []
    (kept,) = check_images.check_changes(rel, image, base, good | {"lmcache"})
    assert "removed []; expected exactly ['lmcache']" in kept
    (absent, _) = check_images.check_changes(rel, image, base - {"lmcache"}, good)
    assert "lacks ['lmcache']" in absent
