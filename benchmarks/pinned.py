"""The PCIe limit: one large copy between pinned host memory and the device, each direction.

Every transfer benchmark compares against this, measured in the same run on the same machine.
Run alone (``python benchmarks/pinned.py --json``) it prints one JSON object; the serving
benchmark runs it that way in its own process before any server holds the GPU. On a machine
without CUDA it times CPU copies (a smoke test, not a PCIe figure).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch


def no_sync() -> None:
    """CPU work is done when it returns."""


def timed(fn: Callable[[], object], repeat: int, sync: Callable[[], None] = no_sync) -> float:
    """Median wall time of ``fn`` (completed on the device) over ``repeat`` runs, after one
    warm-up."""
    fn()
    sync()
    samples = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def raw_copy(
    host: torch.Tensor, device: torch.device, repeat: int, sync: Callable[[], None]
) -> tuple[float, float]:
    """Seconds for one copy of ``host`` (pinned) to and from the device (h2d, d2h): the limit."""
    dev = torch.empty(host.numel(), dtype=torch.uint8, device=device)
    h2d = timed(lambda: dev.copy_(host, non_blocking=True), repeat, sync)
    d2h = timed(lambda: host.copy_(dev, non_blocking=True), repeat, sync)
    return h2d, d2h


def measure(nbytes: int, repeat: int) -> dict[str, object]:
    """Raw pinned copy rates of ``nbytes`` on the default device, as a JSON-able record."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    h2d, d2h = raw_copy(host, device, repeat, sync)
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "bytes": nbytes,
        "repeat": repeat,
        "h2d_s": h2d,
        "d2h_s": d2h,
        "h2d_gbps": nbytes / h2d / 1e9,
        "d2h_gbps": nbytes / d2h / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0, help="bytes per copy, in GiB")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    args = parser.parse_args()
    if args.gib <= 0 or args.repeat < 1:
        parser.error("--gib must be > 0 and --repeat >= 1")
    result = measure(int(args.gib * (1 << 30)), args.repeat)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"h2d {result['h2d_gbps']:.1f} GB/s, d2h {result['d2h_gbps']:.1f} GB/s")


if __name__ == "__main__":
    main()
