"""2 MiB hugepage mappings for the pinned pool.

Hugepages must be reserved by the OS before the engine starts (``sysctl -w vm.nr_hugepages=N``).
We check ``/proc/meminfo`` first so a shortfall is a clear :class:`ConfigError` at start-up,
and map with ``MAP_POPULATE`` so the pages are taken now, not on first touch mid-request.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path

from lmcache.config import ConfigError

HUGEPAGE_BYTES = 2 << 20
_MAP_HUGETLB = 0x40000
_MAP_HUGE_2MB = 21 << 26  # log2(2 MiB) << MAP_HUGE_SHIFT
_MAP_POPULATE = 0x8000
MEMINFO = Path("/proc/meminfo")


def pages_needed(nbytes: int) -> int:
    """Hugepages for a buffer of ``nbytes``: ceil(nbytes / 2 MiB); 5 GB -> 2560."""
    return math.ceil(nbytes / HUGEPAGE_BYTES)


def read_meminfo(path: Path = MEMINFO) -> dict[str, int]:
    """The ``HugePages_*`` and ``Hugepagesize`` lines of /proc/meminfo (counts; size in kB)."""
    info: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return info
    for line in lines:
        name, _, rest = line.partition(":")
        if name.startswith("HugePages_") or name == "Hugepagesize":
            info[name] = int(rest.split()[0])
    return info


def shortfall_message(nbytes: int, meminfo: dict[str, int], origin: str) -> str:
    """The error text for too few free hugepages: what is needed, what is there, the fix."""
    need = pages_needed(nbytes)
    total = meminfo.get("HugePages_Total", 0)
    free = meminfo.get("HugePages_Free", 0)
    return (
        f"local_cpu_use_hugepages=true ({origin}) needs {need} free 2 MiB hugepages for "
        f"max_local_cpu_size={nbytes / (1 << 30):g} GB ({nbytes} bytes), but /proc/meminfo shows "
        f"HugePages_Total: {total}, HugePages_Free: {free}. Reserve them before starting: "
        f"'sudo sysctl -w vm.nr_hugepages={total - free + need}' (persist it in /etc/sysctl.conf), "
        f"or in Kubernetes request 'hugepages-2Mi: {need * 2}Mi'; or set "
        f"local_cpu_use_hugepages=false"
    )


def map_hugepages(nbytes: int, origin: str) -> mmap.mmap:
    """An anonymous, populated 2 MiB-hugepage mapping of at least ``nbytes``.

    Raises :class:`ConfigError` when the pages are not there, before anything is mapped.
    """
    size = pages_needed(nbytes) * HUGEPAGE_BYTES
    meminfo = read_meminfo()
    if meminfo.get("HugePages_Free", 0) < pages_needed(nbytes):
        raise ConfigError(shortfall_message(nbytes, meminfo, origin))
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_HUGETLB | _MAP_HUGE_2MB | _MAP_POPULATE
    try:
        return mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as err:
        raise ConfigError(
            shortfall_message(nbytes, read_meminfo(), origin) + f" (mmap failed: {err})"
        ) from None
