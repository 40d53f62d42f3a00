"""Parsing with defaults, type errors naming the field, and the checks CEL cannot express."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import pytest
from lmcache_operator import api, quantity
from lmcache_operator.spec import SpecError, parse, problems


def check(spec: dict[str, Any]) -> list[str]:
    return problems(parse({"model": "m", **spec}))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("16Gi", 16 * 2**30),
        ("500m", Fraction(1, 2)),
        ("4", 4),
        ("1.5Gi", 3 * 2**29),
        ("16G", 16 * 10**9),
        ("1e3", 1000),
        (2, 2),
    ],
)
def test_quantity_parse(text: str | int, value: Fraction | int) -> None:
    assert quantity.parse(text) == value


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("1.5Gi", "1536Mi"),
        ("1024Mi", "1Gi"),
        ("1000m", "1"),
        ("0.5", "500m"),
        ("16G", "16G"),
        ("1500", "1500"),
        ("2048Ki", "2Mi"),
        (4, "4"),
    ],
)
def test_quantity_canonical_matches_the_api_server(text: str | int, canonical: str) -> None:
    assert quantity.canonical(text) == canonical


def test_quantity_rejects_garbage() -> None:
    with pytest.raises(quantity.QuantityError, match="not a quantity"):
        quantity.parse("lots")


def test_model_required() -> None:
    with pytest.raises(SpecError, match=r"spec\.model: required"):
        parse({})


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"replicas": "two"}, "spec.replicas"),
        ({"replicas": True}, "spec.replicas"),
        ({"lmcache": {"maxLocalCpuSize": "big"}}, "spec.lmcache.maxLocalCpuSize"),
        ({"lmcache": {"hugepages": {"enabled": "yes"}}}, "spec.lmcache.hugepages.enabled"),
        ({"resources": {"memory": "lots"}}, "spec.resources.memory"),
        ({"valkey": {"maxMemory": "4 gigs"}}, "spec.valkey.maxMemory"),
    ],
)
def test_wrong_types_name_the_field(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        parse({"model": "m", **raw})


def test_integer_sizes_are_accepted_as_numbers() -> None:
    assert (
        parse({"model": "m", "lmcache": {"maxLocalCpuSize": 5}}).lmcache.max_local_cpu_size == 5.0
    )


def test_gpus_default_to_tensor_parallel_size() -> None:
    assert parse({"model": "m", "vllm": {"tensorParallelSize": 4}}).gpus_per_pod == 4
    assert parse({"model": "m", "resources": {"gpus": 8}}).gpus_per_pod == 8


def test_a_valid_spec_has_no_problems() -> None:
    assert (
        check(
            {
                "valkey": {"enabled": True},
                "vllm": {
                    "extraArgs": ["--enable-prefix-caching"],
                    "env": [{"name": "A", "value": "1"}],
                },
            }
        )
        == []
    )


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"lmcache": {"extraConfig": {"chunk_size": 128}}},
            "spec.lmcache.extraConfig.chunk_size: managed by the operator; set lmcache.chunkSize",
        ),
        (
            {"lmcache": {"extraConfig": {"remote_url": "valkey://x"}}},
            "spec.lmcache.extraConfig.remote_url: managed by the operator",
        ),
        (
            {"lmcache": {"extraConfig": {"remote_password": "x"}}},
            "set remote.credentialsSecretRef instead",
        ),
        (
            {"vllm": {"extraArgs": ["--tensor-parallel-size=4"]}},
            "spec.vllm.extraArgs: --tensor-parallel-size is rendered by the operator",
        ),
        (
            {"vllm": {"extraArgs": ["--tensor_parallel_size=4"]}},
            "--tensor_parallel_size (vLLM reads it as --tensor-parallel-size) is rendered",
        ),
        (
            {"vllm": {"extraArgs": ["--tensor-parallel=8"]}},
            "--tensor-parallel (vLLM reads it as --tensor-parallel-size) is rendered",
        ),
        (
            {"vllm": {"extraArgs": ["--kv-transfer-config.kv_role=kv_consumer"]}},
            "(vLLM reads it as --kv-transfer-config) is rendered by the operator",
        ),
        (
            {"vllm": {"extraArgs": ["-pp", "2"]}},
            "spec.vllm.extraArgs: -pp is not supported: GPUs and hugepages are sized",
        ),
        (
            {"vllm": {"extraArgs": ["--data-parallel-size=2"]}},
            "spec.vllm.extraArgs: --data-parallel-size is not supported",
        ),
        (
            {"vllm": {"extraArgs": ["--kv-transfer-config", "{}"]}},
            "spec.vllm.extraArgs: --kv-transfer-config is rendered by the operator",
        ),
        (
            {"vllm": {"env": [{"name": "LMCACHE_CHUNK_SIZE", "value": "1"}]}},
            "spec.vllm.env[0].name: LMCACHE_CHUNK_SIZE is set by the operator",
        ),
        (
            {
                "hfTokenSecretRef": {"name": "hf"},
                "vllm": {"env": [{"name": "HF_TOKEN", "value": "x"}]},
            },
            "spec.vllm.env[0].name: HF_TOKEN is set by the operator",
        ),
        (
            {"resources": {"gpus": 1}, "vllm": {"tensorParallelSize": 2}},
            "spec.resources.gpus: 1 GPUs cannot host vllm.tensorParallelSize=2",
        ),
        (
            {"remote": {"url": "memcached://x:1"}},
            "spec.remote.url: scheme 'memcached' not supported",
        ),
        (
            {"remote": {"url": "redis://user:pw@x:6379"}},
            "spec.remote.url: must not carry credentials",
        ),
        (
            {"remote": {"url": "redis://x:6379?password=hunter2"}},
            "spec.remote.url: must not carry credentials",
        ),
        (
            {"remote": {"url": "redis://x:abc"}},
            "spec.remote.url: 'redis://x:abc' is not a valid URL",
        ),
        (
            {"remote": {"url": "redis://[::1:6379"}},
            "is not a valid URL",
        ),
        (
            {"valkey": {"enabled": True, "maxMemory": "8Gi", "resources": {"memory": "8Gi"}}},
            "spec.valkey.resources.memory: 8Gi must exceed valkey.maxMemory 8Gi",
        ),
        (
            {"lmcache": {"extraConfig": {"chunk_sise": 128}}},
            "spec.lmcache.extraConfig.chunk_sise: not a key of the LMCache engine (keys: ",
        ),
        (
            {"lmcache": {"extraConfig": {"remote_timeout_ms": 0}}},
            "spec.lmcache.extraConfig.remote_timeout_ms: 0 is not allowed; the engine takes "
            "an integer >= 1",
        ),
        (
            {"lmcache": {"extraConfig": {"save_unfull_chunk": "yes"}}},
            "spec.lmcache.extraConfig.save_unfull_chunk: 'yes' is not allowed; the engine takes "
            "a boolean",
        ),
        (
            {"lmcache": {"extraConfig": {"remote_breaker_backoff_s": 0}}},
            "the engine takes a number > 0",
        ),
        (
            {"vllm": {"extraArgs": ['--kv-events-config={"enable_kv_cache_events":true}']}},
            "spec.vllm.extraArgs: --kv-events-config is rendered by the operator; use kvEvents",
        ),
        (
            {"volumes": [{"name": "dshm", "emptyDir": {}}]},
            "spec.volumes[0].name: dshm is the operator's; pick another name",
        ),
        (
            {
                "volumes": [{"name": "a", "emptyDir": {}}, {"name": "a", "emptyDir": {}}],
                "volumeMounts": [],
            },
            "spec.volumes[1].name: a is listed twice",
        ),
        (
            {"volumeMounts": [{"name": "nope", "mountPath": "/x"}]},
            "spec.volumeMounts[0].name: no volume 'nope' in spec.volumes",
        ),
        (
            {
                "volumes": [{"name": "w", "emptyDir": {}}],
                "volumeMounts": [{"name": "w", "mountPath": "/var/cache/huggingface"}],
            },
            "spec.volumeMounts[0].mountPath: /var/cache/huggingface is already mounted",
        ),
    ],
)
def test_problems_name_the_field_and_the_fix(spec: dict[str, Any], expected: str) -> None:
    found = check(spec)
    assert any(expected in p for p in found), found


def test_the_metrics_directory_is_the_operators_only_while_metrics_are_on() -> None:
    mount = {
        "volumes": [{"name": "m", "emptyDir": {}}],
        "volumeMounts": [{"name": "m", "mountPath": api.METRICS_DIR}],
    }
    assert any(f"{api.METRICS_DIR} is already mounted" in p for p in check(mount))
    assert check({**mount, "metrics": {"enabled": False}}) == []


def test_hf_token_env_is_fine_without_a_secret_ref() -> None:
    assert check({"vllm": {"env": [{"name": "HF_TOKEN", "value": "x"}]}}) == []
