"""The serving benchmark's verdicts: a table per system, ratios against issue 11's targets, a plot.

Every ratio is between numbers of one run: TTFTs of the servers measured one after the other
on one GPU, and the raw pinned host-to-device rate measured before any server started.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import serve_systems

OFFLOADERS = ("ours", "native", "upstream")
RIVALS = ("native", "upstream")

Result = dict[str, Any]


def _get(result: Result, *keys: str) -> Any:
    """``result[k1][k2]...``, or None where any level is missing."""
    node: Any = result
    for key in keys:
        if not isinstance(node, dict) or node.get(key) is None:
            return None
        node = node[key]
    return node


def _target(
    name: str, value: float | bool | None, op: str, bound: float | bool, note: str
) -> Result:
    ok: bool | None
    if value is None:
        ok = None
    elif op == "<=":
        ok = bool(value <= bound)
    elif op == ">=":
        ok = bool(value >= bound)
    else:
        ok = value == bound
    return {"name": name, "value": value, "target": f"{op} {bound}", "ok": ok, "note": note}


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return None if top is None or bottom is None or bottom == 0 else top / bottom


def targets(results: Result) -> list[Result]:
    """Issue 11's targets, each with its value in this run (None where a system did not run)."""
    systems: Result = results.get("systems", {})
    meta: Result = results.get("meta", {})
    out: list[Result] = []
    cold_ref = _get(systems, "vllm", "seed", "cold_median_s")
    gpu_hit = _get(systems, "vllm", "seed", "warm_median_s")
    h2d = _get(results, "pcie", "h2d_gbps")
    for name in OFFLOADERS:
        seed = _get(systems, name, "seed") or {}
        overhead = _ratio(seed.get("cold_median_s"), cold_ref)
        out.append(
            _target(
                f"cold TTFT overhead, {name} vs vLLM alone",
                None if overhead is None else overhead - 1,
                "<=",
                0.02,
                "median of the seed prompts, computed and stored",
            )
        )
        loaded = seed.get("loaded_tokens_median")
        floor = None
        if gpu_hit is not None and h2d and loaded is not None:
            floor = gpu_hit + loaded * meta["bytes_per_token"] / (h2d * 1e9)
        out.append(
            _target(
                f"warm TTFT / (GPU-hit TTFT + KV bytes / raw H2D), {name}",
                _ratio(seed.get("warm_median_s"), floor),
                "<=",
                1.05,
                f"floor {floor * 1e3:.1f} ms" if floor is not None else "no floor (vLLM or pcie)",
            )
        )
        out.append(
            _target(
                f"warm first token == own GPU-hit first token, {name}",
                _get(seed, "check", "first_token_equals_own_gpu_hit"),
                "==",
                True,
                "same prompt and server, KV loaded from CPU vs found in its GPU prefix cache; "
                "== vLLM alone's: "
                f"{_get(seed, 'check', 'first_token_equals_reference')}",
            )
        )
        out.append(
            _target(
                f"warm greedy output == own GPU-hit output, {name}",
                _get(seed, "check", "warm_equals_own_gpu_hit"),
                "==",
                True,
                "all check tokens; == vLLM alone's: "
                f"{_get(seed, 'check', 'warm_equals_reference')}; vLLM alone's own cold == warm: "
                f"{_get(systems, 'vllm', 'seed', 'check', 'cold_equals_warm')}",
            )
        )
    out.append(
        _target(
            "output check is sensitive: distinct prompts, distinct greedy outputs (vLLM alone)",
            _get(systems, "vllm", "seed", "check", "outputs_differ_across_prompts"),
            "==",
            True,
            "the widened dummy weights make the output depend on the context",
        )
    )
    ours_doc = _get(systems, "ours", "long_doc") or {}
    ours_chat = _get(systems, "ours", "chat") or {}
    for rival in RIVALS:
        doc = _get(systems, rival, "long_doc") or {}
        chat = _get(systems, rival, "chat") or {}
        out.append(
            _target(
                f"long_doc_qa query mean TTFT, {rival} / ours",
                _ratio(_get(doc, "query", "ttft", "mean"), _get(ours_doc, "query", "ttft", "mean")),
                ">=",
                1.2,
                "documents reloaded from CPU",
            )
        )
        out.append(
            _target(
                f"long_doc_qa query round time, {rival} / ours",
                _ratio(_get(doc, "query", "round_s"), _get(ours_doc, "query", "round_s")),
                ">=",
                1.2,
                "",
            )
        )
        all_rounds = _ratio(_get(chat, "ttft", "mean"), _get(ours_chat, "ttft", "mean"))
        out.append(
            _target(
                f"multi-round chat mean TTFT after the first round, {rival} / ours",
                _ratio(
                    _get(chat, "ttft_reuse_rounds", "mean"),
                    _get(ours_chat, "ttft_reuse_rounds", "mean"),
                ),
                ">=",
                1.2,
                "the rounds that reuse the history's KV; all rounds: "
                + ("-" if all_rounds is None else f"{all_rounds:.2f}"),
            )
        )
        out.append(
            _target(
                f"multi-round chat output throughput, ours / {rival}",
                _ratio(ours_chat.get("output_tokens_per_s"), chat.get("output_tokens_per_s")),
                ">=",
                1.0,
                "",
            )
        )
    alone = _get(systems, "vllm", "long_doc", "warmup_median_s")
    others = [
        f"{name} {ratio:.3f}"
        for name in ("native", "upstream", *serve_systems.DIAGNOSTIC)
        if (ratio := _ratio(_get(systems, name, "long_doc", "warmup_median_s"), alone)) is not None
    ]
    out.append(
        _target(
            "no reuse: long_doc_qa warm-up round time, ours / vLLM alone",
            _ratio(_get(ours_doc, "warmup_median_s"), alone),
            "<=",
            1.02,
            "median of the warm-up rounds, every document new: computed and stored"
            + (f"; others / vLLM alone: {', '.join(others)}" if others else ""),
        )
    )
    transfer = results.get("transfer") or {}
    for key, what in (("store_vs_raw_d2h", "store"), ("load_vs_raw_h2d", "load")):
        if key in transfer:
            out.append(
                _target(
                    f"{what} / raw pinned copy", transfer[key], ">=", 0.93, "bench_vllm_transfer"
                )
            )
    return out


TABLE_COLUMNS = (
    ("cold TTFT ms", ("seed", "cold_median_s"), 1e3),
    ("warm TTFT ms", ("seed", "warm_median_s"), 1e3),
    ("doc query TTFT mean ms", ("long_doc", "query", "ttft", "mean"), 1e3),
    ("doc query TTFT p90 ms", ("long_doc", "query", "ttft", "p90"), 1e3),
    ("doc query round s", ("long_doc", "query", "round_s"), 1.0),
    ("doc warm-up round s", ("long_doc", "warmup_median_s"), 1.0),
    ("chat TTFT p50 ms", ("chat", "ttft", "p50"), 1e3),
    ("chat TTFT p90 ms", ("chat", "ttft", "p90"), 1e3),
    ("chat TTFT mean ms, rounds 2+", ("chat", "ttft_reuse_rounds", "mean"), 1e3),
    ("chat tok/s", ("chat", "output_tokens_per_s"), 1.0),
)


def table(results: Result) -> tuple[list[str], list[list[str]]]:
    """Header and one row per system (``-`` where it has no number)."""
    header = ["system", *(c[0] for c in TABLE_COLUMNS)]
    rows = []
    for name, system in results.get("systems", {}).items():
        row = [name if system.get("status") == "ok" else f"{name} ({system.get('status')})"]
        for _, keys, scale in TABLE_COLUMNS:
            value = _get(system, *keys)
            row.append("-" if value is None else f"{value * scale:.1f}")
        rows.append(row)
    return header, rows


def text_report(results: Result) -> str:
    header, rows = table(results)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in [header, *rows]
    ]
    lines.append("")
    for t in results.get("targets", []):
        mark = {True: "MET", False: "NOT MET", None: "n/a"}[t["ok"]]
        value = t["value"]
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"[{mark:>7}] {t['name']}: {shown} (target {t['target']}) {t['note']}")
    return "\n".join(lines)


def plot(results: Result, path: Path) -> None:
    """Bars of the seed TTFTs, long_doc_qa and chat figures per system, and the table under them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = {n: s for n, s in results.get("systems", {}).items() if s.get("status") == "ok"}
    names = list(systems)
    panels = (
        (
            "seed prompts: TTFT (ms)",
            (("cold", ("seed", "cold_median_s")), ("warm", ("seed", "warm_median_s"))),
            1e3,
        ),
        (
            "long_doc_qa: mean TTFT (ms)",
            (
                ("last warm-up", ("long_doc", "warmup", "ttft", "mean")),
                ("query", ("long_doc", "query", "ttft", "mean")),
            ),
            1e3,
        ),
        (
            "long_doc_qa: round time (s)",
            (
                ("warm-up", ("long_doc", "warmup_median_s")),
                ("query", ("long_doc", "query", "round_s")),
            ),
            1.0,
        ),
        (
            "multi-round chat: TTFT (ms)",
            (
                ("p50", ("chat", "ttft", "p50")),
                ("p90", ("chat", "ttft", "p90")),
                ("rounds 2+ mean", ("chat", "ttft_reuse_rounds", "mean")),
            ),
            1e3,
        ),
    )
    figure = plt.figure(figsize=(14, 10))
    grid = figure.add_gridspec(3, 2, height_ratios=[1, 1, 0.6])
    for index, (title, series, scale) in enumerate(panels):
        axis = figure.add_subplot(grid[index // 2, index % 2])
        width = 0.8 / len(series)
        for k, (label, keys) in enumerate(series):
            values = [(_get(systems[n], *keys) or 0.0) * scale for n in names]
            axis.bar([i + k * width for i in range(len(names))], values, width, label=label)
        axis.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(names))], names)
        axis.tick_params(axis="x", labelsize=9 if len(names) > 4 else 10)
        axis.set_title(title)
        axis.legend()
    header, rows = table(results)
    axis = figure.add_subplot(grid[2, :])
    axis.axis("off")
    if rows:
        cells = axis.table(cellText=rows, colLabels=header, loc="center")
        cells.auto_set_font_size(False)
        cells.set_fontsize(7)
    meta = results.get("meta", {})
    figure.suptitle(f"vllm serve, {meta.get('model_name', '')}, {meta.get('device', '')}: one run")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


TRACE_FIELDS = ("issue_load_ms", "gpu_load_wait_ms", "gpu_forward_ms", "queue_store_ms")


def trace_summary(lines: list[str], bytes_per_token: int) -> Result:
    """Medians of the step trace (``BENCH_TRACE``) over steps that load and steps that only
    store: where a warm request's time goes (issuing the loads on the CPU, waiting for them
    on the GPU, the forward pass) and what queueing stores costs a step."""
    loads: list[dict[str, float]] = []
    stores: list[dict[str, float]] = []
    for line in lines:
        fields = dict(
            item.split("=", 1) for item in line.split("LMCTRACE step", 1)[-1].split() if "=" in item
        )
        try:
            step = {key: float(fields[key]) for key in ("loads", "stores", *TRACE_FIELDS)}
        except (KeyError, ValueError):
            continue
        if step["loads"]:
            loads.append(step)
        elif step["stores"]:
            stores.append(step)

    def medians(steps: list[dict[str, float]]) -> Result:
        out: Result = {"steps": len(steps)}
        for key in ("loads", *TRACE_FIELDS):
            out[key] = statistics.median(s[key] for s in steps) if steps else None
        return out

    summary = {"load_steps": medians(loads), "store_steps": medians(stores)}
    rates = [
        s["loads"] * bytes_per_token / (s["gpu_load_wait_ms"] * 1e6)
        for s in loads
        if s["gpu_load_wait_ms"] > 0
    ]
    summary["load_steps"]["gpu_load_gbps"] = statistics.median(rates) if rates else None
    return summary
