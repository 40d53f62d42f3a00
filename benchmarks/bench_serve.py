"""vLLM serving with KV offloading to CPU, side by side: vLLM alone, ours, vLLM's native offload,
upstream LMCache (issue 11's benchmark).

One run on one GPU, same ``vllm serve`` flags for all (see ``serve_systems.py``):

1. the raw pinned host <-> device copy rate, in its own process before any server starts
   (``pinned.py``): the floor of a warm request is the GPU-hit TTFT plus the KV bytes at this rate;
2. the servers start together, each on its own port (or are attached: ``--attach NAME=URL``);
   one that fails to start is reported and the others are still measured;
3. one server at a time, the others idle:
   * the seed's experiment: long prompts cold, then warm (after ``/reset_prefix_cache`` for the
     offloaders: the KV must come from CPU; for vLLM alone the warm request is its GPU-hit floor),
     medians; plus greedy outputs of a warm request, compared with the same server's GPU prefix
     hit of the same prompt (the KV check: the same forward), with vLLM alone's recorded beside
     it (dummy weights widened by the ``benchmarks/gpu/plugin`` plugin so that the output
     depends on the context);
   * LMCache's ``long_doc_qa`` shape: documents that do not fit in GPU KV together but fit the CPU
     pool, ``--warmup-rounds`` rounds of fresh documents (their median: the no-reuse figure),
     then a shuffled query round over the last ones, many requests in flight;
   * production-stack's ``multi-round-qa`` shape: users sharing a system prompt, a growing
     history, a fixed request rate; TTFT over all rounds and over the rounds that reuse history.

``--workloads`` picks among these; ``--trace`` adds our server's step trace to the JSON.

Writes JSON (after each system, so an interrupted run keeps what it measured), the server logs
and a PNG next to it; prints the table and the ratios against the issue's targets. Installs
nothing: vLLM must be importable by ``--python`` (or from ``--site``), upstream LMCache from
``--upstream-path``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import serve_report
import serve_systems
from serve_client import Completion, Hits, Server, session
from serve_workloads import (
    ChatPlan,
    LongDocPlan,
    chat_plan,
    docs_that_fit,
    long_doc_plan,
    seed_prompts,
    summarize,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_MODEL = REPO / "examples" / "models" / "llama-3.1-8b-dummy"
WORKLOADS = ("seed", "long_doc", "chat")
TRACE_ENV = "BENCH_TRACE"
"""Read by the step-trace plugin (``benchmarks/gpu/plugin/lmcache_trace.py``)."""
Result = dict[str, Any]


def bytes_per_token(model_dir: Path, dtype_bytes: int = 2) -> int:
    """KV bytes of one token of the model in ``config.json`` (K and V, every layer, bf16)."""
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", config["num_attention_heads"])
    return int(config["num_hidden_layers"] * 2 * kv_heads * head_dim * dtype_bytes)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_json(path: Path, results: Result) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


def run_json(argv: list[str], env: dict[str, str], timeout_s: float) -> Result:
    """Run a measuring script in its own process; its last stdout line is a JSON object."""
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"{' '.join(argv)}: no result within {timeout_s:.0f} s"}
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-2000:]}"}
    try:
        parsed: Result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": f"no JSON in the output: {done.stdout[-500:]}"}
    return parsed


async def warm_request(
    server: Server,
    prompt: list[int],
    max_tokens: int,
    reset: bool,
    token_ids: bool,
) -> tuple[Completion, Hits, int]:
    """A repeated prompt; with ``reset``, its KV must come from the offloader, not the GPU.

    vLLM skips a prefix-cache reset while blocks are still held (an offloader may keep a
    finished request's blocks until its stores land) and still answers 200. The hit counters
    tell: a warm request that hit the GPU cache is retried after another reset, up to 3 times.
    """
    attempts = 0
    while True:
        attempts += 1
        if reset:
            await server.reset_prefix_cache()
        before = await server.hits()
        result = await server.complete(prompt, max_tokens, token_ids)
        hits = await server.hits() - before
        if not reset or hits.gpu == 0 or attempts == 3:
            return result, hits, attempts


def hit_record(delta: Hits, attempts: int) -> Result:
    return {"gpu": delta.gpu, "external": delta.external, "attempts": attempts}


async def measure_seed(server: Server, args: argparse.Namespace, reset: bool) -> Result:
    prompts = seed_prompts(args.seed, args.prompts + args.check_prompts + 1, args.prompt_tokens)
    warmup, checks, timed = (
        prompts[0],
        prompts[1 : 1 + args.check_prompts],
        prompts[-args.prompts :],
    )
    await server.complete(warmup, 1)  # first use of the store and load paths, not recorded
    await warm_request(server, warmup, 1, reset, token_ids=False)
    cold, warm, hits = [], [], []
    for prompt in timed:
        cold.append((await server.complete(prompt, 1)).ttft_s)
        result, delta, attempts = await warm_request(server, prompt, 1, reset, token_ids=False)
        warm.append(result.ttft_s)
        hits.append(hit_record(delta, attempts))
    cold_ids, own_ids, warm_ids, check_hits = [], [], [], []
    for prompt in checks:
        cold_ids.append(
            (await server.complete(prompt, args.check_tokens, token_ids=True)).token_ids
        )
        if reset:  # this server's own GPU prefix hit: the same forward as its warm request
            own_ids.append(
                (await server.complete(prompt, args.check_tokens, token_ids=True)).token_ids
            )
        result, delta, attempts = await warm_request(
            server, prompt, args.check_tokens, reset, token_ids=True
        )
        warm_ids.append(result.token_ids)
        check_hits.append(hit_record(delta, attempts))
    loaded = [h["external"] for h in hits]
    return {
        "prompt_tokens": args.prompt_tokens,
        "cold_s": cold,
        "warm_s": warm,
        "cold_median_s": statistics.median(cold),
        "warm_median_s": statistics.median(warm),
        "warm_hits": hits,
        "loaded_tokens_median": statistics.median(loaded) if reset else 0,
        "warm_hit_gpu_cache": reset and any(h["gpu"] > 0 for h in hits),
        "check": {
            "tokens": args.check_tokens,
            "cold_token_ids": cold_ids,
            "warm_token_ids": warm_ids,
            # the same prompt again before the reset: a hit in this server's GPU prefix cache,
            # computed the way its warm request is (vLLM alone's warm request is one already)
            "own_gpu_hit_token_ids": own_ids if reset else warm_ids,
            # where each checked warm request's KV came from (a partial load computes the rest
            # in another batch shape, which may round differently)
            "warm_hits": check_hits,
            "warm_equals_cold": cold_ids == warm_ids,
            # With vLLM's default dummy weights every prompt gives the same tokens: then "equal"
            # proves nothing. Distinct prompts must give distinct outputs.
            "outputs_differ_across_prompts": len(cold_ids) > 1
            and len({tuple(ids) for ids in cold_ids}) == len(cold_ids),
        },
    }


async def measure_round(
    server: Server, plan: LongDocPlan, order: list[int], output_tokens: int, in_flight: int
) -> Result:
    gate = asyncio.Semaphore(in_flight)

    async def one(doc: int) -> Completion:
        async with gate:  # like long_doc_qa: a request's clock starts when it gets a slot
            return await server.complete(plan.documents[doc], output_tokens)

    before = await server.hits()
    start = time.perf_counter()
    done = await asyncio.gather(*(one(doc) for doc in order))
    round_s = time.perf_counter() - start
    hits = await server.hits() - before
    return {
        "requests": len(order),
        "ttft": summarize([c.ttft_s for c in done]),
        "round_s": round_s,
        "hit_tokens": {"gpu": hits.gpu, "external": hits.external},
    }


async def measure_long_doc(
    server: Server, plans: list[LongDocPlan], args: argparse.Namespace
) -> Result:
    """Warm-up rounds of fresh documents (nothing to reuse: every one computed and stored),
    the last of which the query round then reuses. One warm-up round is a single sample of a
    few seconds; their median is the no-reuse figure."""
    fresh = [
        await measure_round(server, p, p.warmup_order, args.doc_output_tokens, args.in_flight)
        for p in plans
    ]
    plan = plans[-1]
    query = await measure_round(
        server, plan, plan.query_order, args.doc_output_tokens, args.in_flight
    )
    return {
        "documents": len(plan.documents),
        "doc_tokens": len(plan.documents[0]),
        "in_flight": args.in_flight,
        "output_tokens": args.doc_output_tokens,
        "warmup": fresh[-1],
        "warmup_rounds_s": [r["round_s"] for r in fresh],
        "warmup_median_s": statistics.median(r["round_s"] for r in fresh),
        "query": query,
    }


async def measure_chat(server: Server, plan: ChatPlan) -> Result:
    """TTFT over all rounds, and over the rounds after the first: those reuse the history's
    KV (the first round of each user computes its whole prompt, whoever offloads)."""
    ttfts: list[float] = []
    reuse: list[float] = []
    tokens = 0
    start = time.perf_counter()

    async def user(u: int) -> None:
        nonlocal tokens
        prompt = plan.first_prompt(u)
        for round_ in range(plan.rounds):
            due = start + plan.start_s[u] + round_ * plan.gap_s
            # The workload's arrival schedule (fixed QPS), not a synchronization: a round that
            # finishes late sends the next question at once.
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            answer = await server.complete(prompt, plan.answer_tokens, token_ids=True)
            ttfts.append(answer.ttft_s)
            if round_:
                reuse.append(answer.ttft_s)
            tokens += answer.num_tokens
            if round_ + 1 < plan.rounds:
                prompt = plan.next_prompt(u, round_ + 1, prompt, answer.token_ids)

    before = await server.hits()
    await asyncio.gather(*(user(u) for u in range(plan.users)))
    wall = time.perf_counter() - start
    hits = await server.hits() - before
    return {
        "users": plan.users,
        "rounds": plan.rounds,
        "qps": plan.users / plan.gap_s,
        "requests": len(ttfts),
        "ttft": summarize(ttfts),
        "ttft_reuse_rounds": summarize(reuse) if reuse else None,
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tokens_per_s": tokens / wall,
        "requests_per_s": len(ttfts) / wall,
        "hit_tokens": {"gpu": hits.gpu, "external": hits.external},
    }


async def measure_system(
    name: str, url: str, args: argparse.Namespace, long_doc: list[LongDocPlan], chat: ChatPlan
) -> Result:
    async with session(args.request_timeout) as http:
        server = Server(http, url, "llama")
        out: Result = {}
        for key, work in (
            ("seed", lambda: measure_seed(server, args, reset=name != "vllm")),
            ("long_doc", lambda: measure_long_doc(server, long_doc, args)),
            ("chat", lambda: measure_chat(server, chat)),
        ):
            if key not in args.workloads:
                continue
            started = time.monotonic()
            out[key] = await work()
            print(f"  {name} {key}: {time.monotonic() - started:.1f} s", flush=True)
        return out


def first_tokens(outputs: list[list[int]]) -> list[list[int]]:
    return [ids[:1] for ids in outputs]


def compare_outputs(systems: Result) -> None:
    """Each offloader's warm output against its own server's GPU hit of the same prompts, and
    against vLLM alone's.

    The first generated token is the KV check: one forward pass over the loaded (or GPU-hit)
    KV decides it. It is compared within one server: vLLM with a KV connector computes that
    forward differently from vLLM alone (on the H200 native offload, ours, and our own server's
    GPU hit without any load all gave the same token where vLLM alone gave another), so the
    comparison with vLLM alone is recorded beside it, not used as the check. Later tokens
    also depend on the decode kernels; vLLM alone's own cold and warm outputs part ways after a
    few tokens, so its cold == warm is recorded for scale."""
    vllm_check = (systems.get("vllm") or {}).get("seed", {}).get("check", {})
    reference = vllm_check.get("warm_token_ids")
    if reference is not None and "cold_token_ids" in vllm_check:
        vllm_check["cold_equals_warm"] = vllm_check["cold_token_ids"] == reference
    for name in serve_report.OFFLOADERS:
        check = (systems.get(name) or {}).get("seed", {}).get("check")
        if check is not None:
            warm = check["warm_token_ids"]
            own = check.get("own_gpu_hit_token_ids")
            check["warm_equals_own_gpu_hit"] = None if own is None else warm == own
            check["first_token_equals_own_gpu_hit"] = (
                None if own is None else first_tokens(warm) == first_tokens(own)
            )
            check["warm_equals_reference"] = None if reference is None else warm == reference
            check["first_token_equals_reference"] = (
                None if reference is None else first_tokens(warm) == first_tokens(reference)
            )


def launch(
    args: argparse.Namespace,
    layout: serve_systems.Layout,
    flags: list[str],
    logs: dict[str, Path],
    environ: dict[str, str],
    results: Result,
    servers: dict[str, serve_systems.Launched],
) -> None:
    """Start (or attach) every system's server and wait until each is healthy or has failed.

    With ``--upstream-build``, upstream's server starts once that command succeeds, while the
    others are already starting. ``servers`` is filled as they start, so the caller stops them
    even if this raises. Every system's status lands in ``results``.
    """
    systems: Result = results["systems"]
    commands: Result = results["meta"].setdefault("commands", {})
    specs: dict[str, serve_systems.ServerSpec] = {}
    began = time.monotonic()
    for name in args.systems:
        systems[name] = {"status": "starting"}
        if name in args.attach:
            servers[name] = serve_systems.Launched(args.attach[name], None, began)
            systems[name]["attached"] = args.attach[name]
            continue
        port = free_port()
        try:
            specs[name] = serve_systems.server_spec(name, layout, port, flags, args.cpu_gb)
        except ValueError as error:
            systems[name] = {"status": "failed", "error": str(error)}
            continue
        if args.trace and name == "ours":
            specs[name].env[TRACE_ENV] = "1"
        commands[name] = {"argv": specs[name].argv, "env": specs[name].env}
    build = None
    if args.upstream_build and "upstream" in specs:
        build_log = logs["upstream"].with_name(logs["upstream"].stem + "-build.log")
        with build_log.open("wb") as sink:
            build = subprocess.Popen(
                ["bash", "-c", args.upstream_build], stdout=sink, stderr=subprocess.STDOUT
            )
        systems["upstream"]["build_log"] = str(build_log)
    for name, spec in specs.items():
        if not (name == "upstream" and build is not None):
            servers[name] = serve_systems.Launched(
                f"http://127.0.0.1:{spec.port}",
                serve_systems.start(spec, logs[name], environ),
                time.monotonic(),
            )
    deadline = began + args.startup_timeout
    if build is not None:
        print(f"building upstream LMCache: {args.upstream_build}", flush=True)
        try:
            code: int | None = build.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            build.kill()
            code = None
        build_s = time.monotonic() - began
        systems["upstream"]["build_s"] = build_s
        if code == 0:
            spec = specs["upstream"]
            servers["upstream"] = serve_systems.Launched(
                f"http://127.0.0.1:{spec.port}",
                serve_systems.start(spec, logs["upstream"], environ),
                time.monotonic(),
            )
        else:
            systems["upstream"].update(
                {
                    "status": "failed",
                    "error": f"--upstream-build exited with {code} after {build_s:.0f} s",
                    "log_tail": serve_systems.log_tail(Path(systems["upstream"]["build_log"])),
                }
            )
        print(f"  upstream build: exit {code} after {build_s:.0f} s", flush=True)
    print(f"waiting for {', '.join(servers)} ...", flush=True)
    for name, (startup_s, problem) in serve_systems.wait_healthy(servers, deadline).items():
        systems[name].update(
            {
                "status": "ok" if problem is None else "failed",
                "startup_s": startup_s,
                "error": problem,
            }
        )
        print(f"  {name}: {problem or f'healthy {startup_s:.0f} s after its launch'}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--systems", default=",".join(serve_systems.SYSTEMS), help="comma list")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list")
    p.add_argument(
        "--attach",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="use a server already running for this system instead of starting one",
    )
    p.add_argument("--python", default=sys.executable, help="interpreter of the servers")
    p.add_argument(
        "--vllm-module",
        default=serve_systems.VLLM_CLI,
        help="module started as `python -m MODULE serve MODEL ...`",
    )
    p.add_argument(
        "--site", default="", help="path entries put first for every server (os.pathsep list)"
    )
    p.add_argument(
        "--upstream-path",
        default=None,
        help="upstream LMCache's path entries (os.pathsep list); unset: upstream is skipped",
    )
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument(
        "--cpu-gb",
        type=float,
        default=12.0,
        help="CPU KV of every offloader (GiB): long_doc_qa fills 85%% of it with documents",
    )
    p.add_argument("--kv-cache-bytes", type=int, default=2684354560, help="GPU KV of every server")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.14)
    p.add_argument("--max-model-len", type=int, default=16384)
    p.add_argument("--extra-vllm-args", default="", help="more flags for every server (one string)")
    p.add_argument(
        "--upstream-build",
        default="",
        help="shell command that builds upstream LMCache; its server starts when it succeeds",
    )
    p.add_argument(
        "--startup-timeout", type=float, default=420, help="for all servers, builds included"
    )
    p.add_argument("--request-timeout", type=float, default=300)
    p.add_argument(
        "--budget-s",
        type=float,
        default=480,
        help="start no system's measurements after this many seconds (the device's "
        "calls stop at 600 s: the JSON and the plot must be written before)",
    )
    p.add_argument("--pcie-gib", type=float, default=2.0, help="raw pinned copy size; 0 skips it")
    p.add_argument(
        "--transfer",
        action="store_true",
        help="also run bench_vllm_transfer.py (store/load vs raw pinned) before the servers",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--prompt-tokens",
        type=int,
        default=15409,
        help="963 blocks of 16 + 1: a GPU hit and a connector load leave the same token to compute",
    )
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--check-prompts", type=int, default=6)
    p.add_argument("--check-tokens", type=int, default=16)
    p.add_argument("--doc-tokens", type=int, default=16000)
    p.add_argument("--docs", type=int, default=0, help="0: as many as fill 85%% of the CPU pool")
    p.add_argument("--doc-repeat", type=int, default=4)
    p.add_argument(
        "--warmup-rounds",
        type=int,
        default=3,
        help="long_doc_qa warm-up rounds, each of fresh documents (the no-reuse median)",
    )
    p.add_argument("--doc-output-tokens", type=int, default=32)
    p.add_argument("--in-flight", type=int, default=16)
    p.add_argument("--chat-users", type=int, default=6)
    p.add_argument("--chat-rounds", type=int, default=4)
    p.add_argument("--chat-system-tokens", type=int, default=1000)
    p.add_argument("--chat-user-tokens", type=int, default=4000)
    p.add_argument("--chat-question-tokens", type=int, default=32)
    p.add_argument("--chat-answer-tokens", type=int, default=64)
    p.add_argument("--chat-qps", type=float, default=2.0)
    p.add_argument(
        "--trace",
        action="store_true",
        help="ours logs each step's load and forward times (gpu/plugin/lmcache_trace.py)",
    )
    p.add_argument("--out", type=Path, default=Path(".bench/serve.json"))
    args = p.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(args.systems) - set(serve_systems.KNOWN))
    if unknown:
        p.error(f"--systems: unknown {unknown}; known: {', '.join(serve_systems.KNOWN)}")
    args.workloads = [w for w in args.workloads.split(",") if w]
    unknown = sorted(set(args.workloads) - set(WORKLOADS))
    if unknown:
        p.error(f"--workloads: unknown {unknown}; known: {', '.join(WORKLOADS)}")
    attach: dict[str, str] = {}
    for item in args.attach:
        name, sep, url = item.partition("=")
        if not sep or name not in serve_systems.KNOWN or not url.startswith("http"):
            p.error(
                f"--attach {item!r}: expected NAME=http://HOST:PORT, NAME one of "
                f"{', '.join(serve_systems.KNOWN)}"
            )
        attach[name] = url
    args.attach = attach
    if args.warmup_rounds < 1:
        p.error("--warmup-rounds must be >= 1")
    if args.prompt_tokens + args.check_tokens > args.max_model_len:
        p.error("--prompt-tokens + --check-tokens must fit --max-model-len")
    if args.doc_tokens + args.doc_output_tokens > args.max_model_len:
        p.error("--doc-tokens + --doc-output-tokens must fit --max-model-len")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    per_token = bytes_per_token(args.model)
    gpu_tokens = args.kv_cache_bytes // per_token
    pool_tokens = int(args.cpu_gb * (1 << 30)) // per_token
    docs = args.docs or docs_that_fit(pool_tokens, args.doc_tokens)
    long_doc = [
        long_doc_plan(args.seed + 1000 * k, docs, args.doc_tokens, args.doc_repeat)
        for k in range(args.warmup_rounds - 1, -1, -1)
    ]  # the last one is args.seed's: its documents are queried
    chat = chat_plan(
        args.seed,
        args.chat_users,
        args.chat_rounds,
        args.chat_system_tokens,
        args.chat_user_tokens,
        args.chat_question_tokens,
        args.chat_answer_tokens,
        args.chat_qps,
    )
    if chat.final_tokens(0) + args.chat_answer_tokens > args.max_model_len:
        sys.exit("multi-round chat: the last round's prompt and answer exceed --max-model-len")
    out: Path = args.out
    results: Result = {
        "meta": {
            "argv": sys.argv,
            "model": str(args.model),
            "model_name": args.model.name,
            "bytes_per_token": per_token,
            "gpu_kv_tokens": gpu_tokens,
            "cpu_pool_tokens": pool_tokens,
            "long_doc_documents": docs,
            "long_doc_fits_gpu": docs * args.doc_tokens <= gpu_tokens,
            "long_doc_fits_cpu": docs * args.doc_tokens <= pool_tokens,
            "chat_unique_tokens": len(chat.system_prompt)
            + sum(chat.final_tokens(u) - len(chat.system_prompt) for u in range(chat.users)),
        },
        "systems": {},
    }
    environ = dict(os.environ)
    inherited = environ.pop("PYTHONPATH", "")
    site = tuple(p for p in args.site.split(os.pathsep) if p)
    script_env = {**environ, "PYTHONPATH": os.pathsep.join([str(REPO), *site, inherited])}

    if args.pcie_gib > 0:
        print("raw pinned copies ...", flush=True)
        results["pcie"] = run_json(
            [args.python, str(HERE / "pinned.py"), "--gib", str(args.pcie_gib), "--json"],
            script_env,
            300,
        )
        results["meta"]["device"] = results["pcie"].get("device")
        print(f"  {results['pcie']}", flush=True)
    if args.transfer:
        print("bench_vllm_transfer ...", flush=True)
        transfer_out = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "transfer.json"
        done = run_json(
            [args.python, str(HERE / "bench_vllm_transfer.py"), "--out", str(transfer_out)],
            script_env,
            300,
        )
        results["transfer"] = (
            json.loads(transfer_out.read_text()) if transfer_out.exists() else done
        )

    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    config_file = workdir / "cpu-offload.yaml"
    config_file.write_text(serve_systems.seed_config(args.cpu_gb))
    upstream = (
        tuple(p for p in args.upstream_path.split(os.pathsep) if p) if args.upstream_path else None
    )
    layout = serve_systems.Layout(
        args.python, args.model, REPO, config_file, site, upstream, args.vllm_module
    )
    flags = serve_systems.common_flags(
        args.max_model_len,
        args.gpu_memory_utilization,
        args.kv_cache_bytes,
        shlex.split(args.extra_vllm_args),
    )
    systems: Result = results["systems"]
    logs = {name: out.parent / f"{out.stem}-{name}.log" for name in args.systems}
    servers: dict[str, serve_systems.Launched] = {}
    try:
        launch(args, layout, flags, logs, environ, results, servers)
        write_json(out, results)
        for name in args.systems:
            if systems[name]["status"] != "ok":
                continue
            if time.monotonic() - began > args.budget_s:
                systems[name].update(
                    {"status": "skipped", "error": f"--budget-s {args.budget_s:.0f} s spent"}
                )
                continue
            print(f"measuring {name} ...", flush=True)
            try:
                systems[name].update(
                    asyncio.run(measure_system(name, servers[name].url, args, long_doc, chat))
                )
            except Exception as error:  # one system's failure must not lose the others' numbers
                systems[name].update(
                    {"status": "failed", "error": f"{type(error).__name__}: {error}"}
                )
            finally:
                servers[name].stop()
            write_json(out, results)
    finally:
        for server in servers.values():
            server.stop()
    for name in args.systems:
        if name in logs and logs[name].exists():
            systems[name]["log"] = str(logs[name])
            systems[name]["log_lines"] = serve_systems.log_lines(
                logs[name], serve_systems.LOG_PATTERNS[name]
            )
            if systems[name]["status"] != "ok":
                systems[name]["log_tail"] = serve_systems.log_tail(logs[name])
            if args.trace and name == "ours":
                systems[name]["trace"] = serve_report.trace_summary(
                    serve_systems.log_lines(logs[name], "LMCTRACE step", last=100000), per_token
                )
    compare_outputs(systems)
    results["targets"] = serve_report.targets(results)
    results["meta"]["wall_s"] = time.monotonic() - began
    try:
        serve_report.plot(results, out.with_suffix(".png"))
        results["plot"] = str(out.with_suffix(".png"))
    except Exception as error:  # a missing matplotlib or a plotting bug must not lose the JSON
        results["plot"] = f"not drawn: {type(error).__name__}: {error}"
    write_json(out, results)
    print(serve_report.text_report(results))
    print(f"wrote {out} ({results['meta']['wall_s']:.0f} s)")
    return 0 if all(s["status"] == "ok" for s in systems.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
