"""Fail unless the importable `lmcache` package is lmcache-kube's, file for file.

Run by install.sh after the install: vLLM images bundle upstream `lmcache` (vLLM's KV
connectors), and two distributions sharing one package directory import a mix of both.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import sys
from pathlib import Path

OURS = "lmcache-kube"


def problems() -> list[str]:
    owners = md.packages_distributions().get("lmcache", [])
    found = []
    if owners != [OURS]:
        found.append(f"the `lmcache` package is provided by {owners}; expected only [{OURS!r}]")
    spec = importlib.util.find_spec("lmcache")
    if spec is None or spec.origin is None:
        return [*found, "`lmcache` is not importable"]
    package = Path(spec.origin).resolve().parent
    dist = md.distribution(OURS)
    recorded = {Path(str(dist.locate_file(f))).resolve() for f in dist.files or []}
    strays = sorted(
        str(p.relative_to(package.parent))
        for p in package.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.resolve() not in recorded
    )
    if strays:
        shown = ", ".join(strays[:5]) + (f" and {len(strays) - 5} more" if len(strays) > 5 else "")
        found.append(f"{package} holds files {OURS} did not install: {shown}")
    return found


if __name__ == "__main__":
    found = problems()
    for problem in found:
        print(f"check_lmcache_owner: {problem}", file=sys.stderr)
    sys.exit(1 if found else 0)
