"""Engine config for the connector: file < env < ``lmcache.<key>`` in kv_connector_extra_config."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmcache.config import ConfigError
from lmcache.integration.vllm.settings import engine_config
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
