"""Engine config for the connector: file < env < ``lmcache.<key>`` in kv_connector_extra_config."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from lmcache.config import ConfigError
from lmcache.integration.vllm.settings import engine_config, local_weights, model_identity
from tests.vllm.conftest import make_vllm_config


def test_extra_config_overrides_file_and_env(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_file = tmp_path / "cpu-offload.yaml"
    config_file.write_text("chunk_size: 128\nlocal_cpu: true\nmax_local_cpu_size: 2.0\n")
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(config_file))
    monkeypatch.setenv("LMCACHE_MAX_LOCAL_CPU_SIZE", "3")
    vllm_config = make_vllm_config(model_dir, {"lmcache.chunk_size": 64, "other": 1})
    transfer = vllm_config.kv_transfer_config
    assert transfer is not None
    transfer.kv_connector_extra_config.pop("lmcache.max_local_cpu_size")  # the rig's default

    config = engine_config(vllm_config)
    assert config.chunk_size == 64
    assert str(config.source_of("chunk_size")) == "kv_connector_extra_config"
    assert config.max_local_cpu_size == 3.0
    assert str(config.source_of("max_local_cpu_size")) == "env LMCACHE_MAX_LOCAL_CPU_SIZE"
    assert config.local_cpu is True


def test_bad_extra_value_names_its_source(model_dir: Path) -> None:
    vllm_config = make_vllm_config(model_dir, {"lmcache.chunk_size": "many"})
    with pytest.raises(
        ConfigError, match="chunk_size: invalid value 'many' from kv_connector_extra_config"
    ):
        engine_config(vllm_config)


def write_weights(model: Path, seed: int) -> None:
    """Two shards of random bytes (3 MiB and 100 KiB), as a local checkpoint would hold."""
    rng = random.Random(seed)
    (model / "model-00001-of-00002.safetensors").write_bytes(rng.randbytes(3 << 20))
    (model / "model-00002-of-00002.safetensors").write_bytes(rng.randbytes(100 << 10))


def test_local_weights_rewritten_in_place_change_the_keys(model_dir: Path, tmp_path: Path) -> None:
    """A new fine-tune saved under the same path must not load the old weights' KV from disk or
    Valkey; the same weights on another pod (another copy) must keep sharing it."""
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    write_weights(model, seed=1)
    before = model_identity(make_vllm_config(model))
    assert local_weights(model) is not None and local_weights(model) in before

    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    assert local_weights(copy) == local_weights(model)

    write_weights(model, seed=2)  # same names and sizes, new values
    assert model_identity(make_vllm_config(model)) != before


def test_no_weights_no_fingerprint(model_dir: Path, tmp_path: Path) -> None:
    assert local_weights(model_dir) is None  # config.json only
    assert local_weights(tmp_path / "missing") is None
    dummy = make_vllm_config(model_dir)
    dummy.load_config.load_format = "dummy"
    assert model_identity(dummy).endswith("+seed0")
