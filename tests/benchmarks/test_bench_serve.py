"""The serving benchmark's driver, dry-run on CPU against stand-ins for ``vllm serve``.

No GPU here, so ``tests/benchmarks/fake_vllm.py`` plays the four servers (a mock: the real ones
run on the GPU machine). What the dry run proves is the driver's own behaviour: the servers'
command lines and paths, starting them together, one failure not stopping the others, every
workload's requests and records, the output check catching wrong KV, the ratios and the files.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import serve_report
import serve_systems
from bench_serve import DEFAULT_MODEL, REPO, bytes_per_token, main
from serve_client import counter_total


def layout(tmp_path: Path, upstream: tuple[str, ...] | None) -> serve_systems.Layout:
    return serve_systems.Layout(
        python="python3",
        model=DEFAULT_MODEL,
        repo=REPO,
        config_file=tmp_path / "cpu-offload.yaml",
        site=("/tmp/site",),
        upstream=upstream,
    )


def test_llama_8b_kv_is_128_kib_per_token() -> None:
    assert bytes_per_token(DEFAULT_MODEL) == 32 * 2 * 8 * 128 * 2


def test_servers_differ_only_in_what_offloads(tmp_path: Path) -> None:
    where = layout(tmp_path, upstream=("/tmp/site-upstream/src", "/tmp/site-upstream/deps"))
    flags = serve_systems.common_flags(16384, 0.14, 2684354560, ["--seed", "1"])
    specs = {n: serve_systems.server_spec(n, where, 8000, flags, 5.0) for n in serve_systems.KNOWN}
    for spec in specs.values():
        assert spec.argv[:6] == [
            "python3",
            "-m",
            serve_systems.VLLM_CLI,
            "serve",
            str(DEFAULT_MODEL),
            "--port",
        ]
        assert spec.argv[7 : 7 + len(flags)] == flags
        assert spec.env["VLLM_SERVER_DEV_MODE"] == "1"
        assert spec.env["PYTHONPATH"].endswith(
            os.pathsep.join([str(serve_systems.PLUGIN_DIR), "/tmp/site"])
        )
    assert specs["vllm"].argv[7 + len(flags) :] == []
    assert specs["native"].argv[7 + len(flags) :] == ["--kv-offloading-size", "5.0"]
    roles = {"ours": "kv_both", "upstream": "kv_both"} | serve_systems.DIAGNOSTIC
    for name, role in roles.items():
        flag, config = specs[name].argv[7 + len(flags) :]
        assert flag == "--kv-transfer-config"
        assert json.loads(config) == {"kv_connector": "LMCacheConnectorV1", "kv_role": role}
        assert specs[name].env["LMCACHE_CONFIG_FILE"] == str(tmp_path / "cpu-offload.yaml")
        if name != "upstream":
            assert specs[name].env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)
    ours_path = specs["ours"].env["PYTHONPATH"].split(os.pathsep)
    upstream_path = specs["upstream"].env["PYTHONPATH"].split(os.pathsep)
    assert ours_path[0] == str(REPO)
    assert upstream_path[:2] == ["/tmp/site-upstream/src", "/tmp/site-upstream/deps"]
    assert str(REPO) not in upstream_path  # both packages are `lmcache`: never on one path
    assert "LMCACHE_CONFIG_FILE" not in specs["native"].env


def test_upstream_without_a_path_and_unknown_systems_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--upstream-path"):
        serve_systems.server_spec("upstream", layout(tmp_path, None), 8000, [], 5.0)
    with pytest.raises(ValueError, match="unknown system 'sglang'"):
        serve_systems.server_spec("sglang", layout(tmp_path, None), 8000, [], 5.0)


def test_seed_config_is_the_seeds_file() -> None:
    assert (
        serve_systems.seed_config(5.0)
        == "chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 5.0\n"
    )


def test_counter_total_sums_label_sets_of_one_counter_only() -> None:
    text = (
        "# HELP vllm:prefix_cache_hits_total hits\n"
        'vllm:prefix_cache_hits_total{engine="0",model_name="llama"} 15408.0\n'
        'vllm:prefix_cache_hits_total{engine="1",model_name="llama"} 2.0\n'
        'vllm:prefix_cache_hits_created{engine="0"} 1.7e9\n'
        'vllm:external_prefix_cache_hits_total{engine="0"} 7.0\n'
    )
    assert counter_total(text, "vllm:prefix_cache_hits_total") == 15410.0
    assert counter_total(text, "vllm:external_prefix_cache_hits_total") == 7.0
    assert counter_total(text, "vllm:nothing_total") == 0.0


def test_trace_summary_splits_load_steps_from_store_steps() -> None:
    lines = [
        "(EngineCore) LMCache INFO: LMCTRACE step wall=1.0 loads=1000 stores=0 issue_load_ms=5.0 "
        "gpu_load_wait_ms=2.0 gpu_forward_ms=5.0 queue_store_ms=0.0",
        "(EngineCore) LMCache INFO: LMCTRACE step wall=2.0 loads=1000 stores=3 issue_load_ms=7.0 "
        "gpu_load_wait_ms=4.0 gpu_forward_ms=6.0 queue_store_ms=1.0",
        "(EngineCore) LMCache INFO: LMCTRACE step wall=3.0 loads=0 stores=32 issue_load_ms=0.0 "
        "gpu_load_wait_ms=0.0 gpu_forward_ms=200.0 queue_store_ms=3.0",
        "LMCTRACE step garbled",
    ]
    summary = serve_report.trace_summary(lines, bytes_per_token=1_000_000)
    loads, stores = summary["load_steps"], summary["store_steps"]
    assert loads["steps"] == 2 and stores["steps"] == 1
    assert loads["issue_load_ms"] == 6.0 and loads["gpu_load_wait_ms"] == 3.0
    assert loads["gpu_load_gbps"] == 375.0  # 1e9 bytes in 2 ms and in 4 ms: 500 and 250 GB/s
    assert stores["queue_store_ms"] == 3.0 and stores["gpu_forward_ms"] == 200.0
    assert serve_report.trace_summary([], 1)["load_steps"]["gpu_load_gbps"] is None


def test_targets_use_the_gpu_hit_plus_kv_bytes_at_raw_h2d_as_the_warm_floor() -> None:
    results = {
        "meta": {"bytes_per_token": 131072},
        "pcie": {"h2d_gbps": 50.0},
        "systems": {
            "vllm": {"seed": {"cold_median_s": 0.400, "warm_median_s": 0.020}},
            "ours": {
                "seed": {
                    "cold_median_s": 0.404,
                    "warm_median_s": 0.070,
                    "loaded_tokens_median": 15408,
                    "check": {"warm_equals_own_gpu_hit": True, "warm_equals_reference": False},
                }
            },
        },
    }
    found = {t["name"]: t for t in serve_report.targets(results)}
    overhead = found["cold TTFT overhead, ours vs vLLM alone"]
    assert overhead["value"] == pytest.approx(0.01) and overhead["ok"] is True
    floor = 0.020 + 15408 * 131072 / 50e9
    warm = found["warm TTFT / (GPU-hit TTFT + KV bytes / raw H2D), ours"]
    assert warm["value"] == pytest.approx(0.070 / floor) and warm["ok"] is False
    output = found["warm greedy output == own GPU-hit output, ours"]
    assert output["ok"] is True and "== vLLM alone's: False" in output["note"]
    assert found["cold TTFT overhead, native vs vLLM alone"]["ok"] is None  # did not run


SMALL = [
    "--python", sys.executable,
    "--vllm-module", "tests.benchmarks.fake_vllm",
    "--site", str(REPO),
    "--pcie-gib", "0.001",
    "--prompt-tokens", "97", "--prompts", "2", "--check-prompts", "2", "--check-tokens", "4",
    "--doc-tokens", "300", "--docs", "3", "--doc-repeat", "2", "--doc-output-tokens", "4",
    "--in-flight", "4", "--warmup-rounds", "2",
    "--chat-users", "3", "--chat-rounds", "2", "--chat-system-tokens", "50",
    "--chat-user-tokens", "100", "--chat-question-tokens", "8", "--chat-answer-tokens", "4",
    "--chat-qps", "50",
    "--startup-timeout", "60",
]  # fmt: skip


def test_dry_run_against_stand_in_servers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # `python -m tests.benchmarks.fake_vllm` resolves from here
    monkeypatch.setenv("FAKE_VLLM_FAIL_FLAG", "--kv-offloading-size")  # native fails to start
    monkeypatch.setenv("FAKE_VLLM_CORRUPT_PATH", "upstream-lmcache")  # upstream loads wrong KV
    out = tmp_path / "serve.json"
    code = main(
        [
            *SMALL,
            "--upstream-path", str(tmp_path / "upstream-lmcache"),
            "--upstream-build", "echo upstream ops built",
            "--trace",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 1  # one system failed
    results = json.loads(out.read_text())
    systems = results["systems"]
    assert systems["native"]["status"] == "failed"
    assert "exited with code 1" in systems["native"]["error"]
    assert any("failing on purpose" in line for line in systems["native"]["log_tail"])
    for name in ("vllm", "ours", "upstream"):
        system = systems[name]
        assert system["status"] == "ok", system
        assert len(system["seed"]["cold_s"]) == len(system["seed"]["warm_s"]) == 2
        assert system["long_doc"]["documents"] == 3
        assert system["long_doc"]["warmup"]["requests"] == 3
        assert len(system["long_doc"]["warmup_rounds_s"]) == 2  # fresh documents, then the queried
        assert system["chat"]["ttft_reuse_rounds"]["n"] == 3  # every user's second round
        assert system["long_doc"]["query"]["requests"] == 6
        assert system["chat"]["requests"] == 6
        assert system["chat"]["output_tokens"] == 6 * 4
        assert Path(system["log"]).exists()
    # vLLM alone's warm request is a GPU hit; an offloader's comes from its store after the reset.
    assert all(h["gpu"] == 96 and h["external"] == 0 for h in systems["vllm"]["seed"]["warm_hits"])
    assert all(h["gpu"] == 0 and h["external"] == 96 for h in systems["ours"]["seed"]["warm_hits"])
    assert systems["ours"]["seed"]["loaded_tokens_median"] == 96
    assert [h["external"] for h in systems["ours"]["seed"]["check"]["warm_hits"]] == [96, 96]
    # The stand-in's GPU cache never evicts: the query round is all GPU hits, the warm-up none.
    assert systems["ours"]["long_doc"]["warmup"]["hit_tokens"] == {"gpu": 0, "external": 0}
    assert systems["ours"]["long_doc"]["query"]["hit_tokens"] == {"gpu": 6 * 299, "external": 0}
    assert any("LMCache" in line for line in systems["ours"]["log_lines"])
    # The output check: equal for ours, caught for the server that loads wrong KV.
    assert systems["vllm"]["seed"]["check"]["outputs_differ_across_prompts"] is True
    assert systems["ours"]["seed"]["check"]["warm_equals_reference"] is True
    assert systems["ours"]["seed"]["check"]["first_token_equals_reference"] is True
    assert systems["ours"]["seed"]["check"]["first_token_equals_own_gpu_hit"] is True
    own = systems["upstream"]["seed"]["check"]["own_gpu_hit_token_ids"]
    assert own == systems["upstream"]["seed"]["check"]["cold_token_ids"]  # its GPU hit is right
    assert systems["upstream"]["seed"]["check"]["first_token_equals_own_gpu_hit"] is False
    assert systems["upstream"]["seed"]["check"]["first_token_equals_reference"] is False
    assert systems["upstream"]["seed"]["check"]["warm_equals_cold"] is False
    assert systems["upstream"]["seed"]["check"]["warm_equals_reference"] is False
    commands = results["meta"]["commands"]
    # --trace: only ours runs the step-trace plugin; the stand-in logs no steps.
    assert commands["ours"]["env"]["BENCH_TRACE"] == "1"
    assert all("BENCH_TRACE" not in commands[n]["env"] for n in ("vllm", "upstream"))
    assert systems["ours"]["trace"]["load_steps"]["steps"] == 0
    assert commands["upstream"]["env"]["PYTHONPATH"].startswith(str(tmp_path / "upstream-lmcache"))
    assert Path(systems["upstream"]["build_log"]).read_text() == "upstream ops built\n"
    found = {t["name"]: t for t in results["targets"]}
    assert found["warm greedy output == own GPU-hit output, upstream"]["ok"] is False
    assert found["warm first token == own GPU-hit first token, ours"]["ok"] is True
    assert found["cold TTFT overhead, ours vs vLLM alone"]["value"] is not None
    assert results["pcie"]["h2d_gbps"] > 0
    png = out.with_suffix(".png")
    assert results["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_upstream_build_fails_upstream_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    out = tmp_path / "serve.json"
    code = main(
        [
            *SMALL,
            "--systems", "vllm,upstream",
            "--upstream-path", str(tmp_path / "upstream-lmcache"),
            "--upstream-build", "echo nvcc exploded; exit 3",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 1
    systems = json.loads(out.read_text())["systems"]
    assert systems["upstream"]["status"] == "failed"
    assert "--upstream-build exited with 3" in systems["upstream"]["error"]
    assert systems["upstream"]["log_tail"] == ["nvcc exploded"]
    assert systems["vllm"]["status"] == "ok" and systems["vllm"]["chat"]["requests"] == 6


def test_past_the_budget_systems_are_skipped_and_the_files_still_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    out = tmp_path / "serve.json"
    code = main([*SMALL, "--systems", "vllm", "--budget-s", "0", "--out", str(out)])
    assert code == 1
    results = json.loads(out.read_text())
    assert results["systems"]["vllm"]["status"] == "skipped"
    assert "--budget-s 0 s spent" in results["systems"]["vllm"]["error"]
    assert out.with_suffix(".png").exists()


def test_workloads_picks_what_is_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    out = tmp_path / "serve.json"
    code = main([*SMALL, "--systems", "vllm,ours", "--workloads", "seed", "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    for name in ("vllm", "ours"):
        assert "seed" in results["systems"][name]
        assert "long_doc" not in results["systems"][name] and "chat" not in results["systems"][name]
    found = {t["name"]: t for t in results["targets"]}
    assert found["warm first token == own GPU-hit first token, ours"]["ok"] is True
    assert found["long_doc_qa query mean TTFT, native / ours"]["ok"] is None
    with pytest.raises(SystemExit):
        main([*SMALL, "--workloads", "seed,sleep", "--out", str(out)])
