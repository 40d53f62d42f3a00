from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lmcache import ConfigError, LMCacheEngineConfig
from lmcache.config import KEYS
from lmcache.memory.hugepages import pages_needed, shortfall_message


def load(tmp_path: Path, yaml_text: str | None = None, **env: str) -> LMCacheEngineConfig:
    if yaml_text is not None:
        path = tmp_path / "config.yaml"
        path.write_text(yaml_text)
        env["LMCACHE_CONFIG_FILE"] = str(path)
    return LMCacheEngineConfig.load(env=env)


def test_defaults_match_the_seed(tmp_path: Path) -> None:
    config = load(tmp_path)
    assert (config.chunk_size, config.local_cpu, config.max_local_cpu_size) == (256, True, 5.0)
    assert config.local_cpu_use_hugepages is False
    assert config.max_local_cpu_bytes == 5 * (1 << 30)
    assert all(str(source) == "default" for _, _, source in config.effective())


def test_seed_env_vars(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        LMCACHE_CHUNK_SIZE="256",
        LMCACHE_LOCAL_CPU="True",
        LMCACHE_MAX_LOCAL_CPU_SIZE="5.0",
        LMCACHE_LOCAL_CPU_USE_HUGEPAGES="true",
    )
    assert config.local_cpu and config.local_cpu_use_hugepages
    assert str(config.source_of("chunk_size")) == "env LMCACHE_CHUNK_SIZE"


def test_seed_yaml_file(tmp_path: Path) -> None:
    config = load(tmp_path, "chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 5.0\n")
    assert config.chunk_size == 256 and config.max_local_cpu_size == 5.0
    assert str(config.source_of("local_cpu")) == f"file {tmp_path / 'config.yaml'}"


def test_env_overrides_file_and_overrides_beat_env(tmp_path: Path) -> None:
    config = load(tmp_path, "chunk_size: 128\nlocal_cpu: false\n", LMCACHE_CHUNK_SIZE="64")
    assert config.chunk_size == 64 and config.local_cpu is False
    path = tmp_path / "config.yaml"
    over = LMCacheEngineConfig.load(
        env={"LMCACHE_CONFIG_FILE": str(path), "LMCACHE_CHUNK_SIZE": "64"},
        overrides={"chunk_size": 32},
        overrides_source="kv_connector_extra_config",
    )
    assert over.chunk_size == 32
    assert str(over.source_of("chunk_size")) == "kv_connector_extra_config"


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("Yes", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        ("NO", False),
    ],
)
def test_booleans_any_case(tmp_path: Path, raw: str, expected: bool) -> None:
    assert load(tmp_path, LMCACHE_LOCAL_CPU=raw).local_cpu is expected


@pytest.mark.parametrize(
    "env,key,allowed",
    [
        ({"LMCACHE_MAX_LOCAL_CPU_SIZE": "0"}, "max_local_cpu_size", "> 0"),
        ({"LMCACHE_MAX_LOCAL_CPU_SIZE": "-1"}, "max_local_cpu_size", "> 0"),
        ({"LMCACHE_MAX_LOCAL_CPU_SIZE": "five"}, "max_local_cpu_size", "a number"),
        ({"LMCACHE_CHUNK_SIZE": "0"}, "chunk_size", "an integer >= 1"),
        ({"LMCACHE_CHUNK_SIZE": "1.5"}, "chunk_size", "an integer"),
        ({"LMCACHE_LOCAL_CPU": "maybe"}, "local_cpu", "true/false"),
        ({"LMCACHE_REMOTE_SERDE": "pickle"}, "remote_serde", "naive"),
        ({"LMCACHE_REMOTE_URL": "http://h:1"}, "remote_url", "valkey://"),
        ({"LMCACHE_METRICS_PORT": "70000"}, "metrics_port", "<= 65535"),
    ],
)
def test_bad_env_value_names_key_source_and_allowed(
    tmp_path: Path, env: dict[str, str], key: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, **env)
    message = str(err.value)
    assert message.startswith(f"{key}:")
    assert f"env {next(iter(env))}" in message
    assert allowed in message


@pytest.mark.parametrize(
    "yaml_text,key,allowed",
    [
        ("local_disk: [/a, /b]\n", "local_disk", "a string"),
        ("shm_name: {a: 1}\n", "shm_name", "a string"),
        ("remote_url: [valkey://h:1]\n", "remote_url", "a string"),
        ("max_local_cpu_size: 1e300\n", "max_local_cpu_size", "<= 65536"),
        ("remote_timeout_ms: 1e18\n", "remote_timeout_ms", "<= 60000"),
        ("remote_write_timeout_ms: 1e18\n", "remote_write_timeout_ms", "<= 600000"),
        ("chunk_size: 1e30\n", "chunk_size", "<= 65536"),
        ("remote_ttl_s: 1e40\n", "remote_ttl_s", "<= "),
        ("remote_breaker_backoff_s: .inf\n", "remote_breaker_backoff_s", "a finite number"),
        ("local_cpu: [true]\n", "local_cpu", "a boolean"),
        ("chunk_size: true\n", "chunk_size", "an integer"),
        ("max_local_disk_size: -1\n", "max_local_disk_size", ">= 0"),
    ],
)
def test_wrong_types_and_out_of_range_numbers_name_the_key(
    tmp_path: Path, yaml_text: str, key: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, yaml_text)
    message = str(err.value)
    assert message.startswith(f"{key}: invalid value") and "from file" in message
    assert allowed in message


def test_yaml_aliases_are_refused_before_expansion(tmp_path: Path) -> None:
    """A "billion laughs" file on a real key: refused at the first alias, in milliseconds,
    instead of expanding to gigabytes."""
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    lines.append("local_disk: *a8")
    with pytest.raises(ConfigError, match=r"malformed YAML at line 2.*aliases"):
        load(tmp_path, "\n".join(lines) + "\n")


def test_oversized_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is over 1048576 bytes"):
        load(tmp_path, "# " + "x" * (1 << 20) + "\nchunk_size: 256\n")


def test_bad_file_value_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"chunk_size: .* from file .*config.yaml; allowed"):
        load(tmp_path, "chunk_size: -5\n")


@pytest.mark.parametrize("other", ["enable_p2p: true", "shm_name: lmcache-shm"])
def test_hugepages_conflicts(tmp_path: Path, other: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, f"local_cpu_use_hugepages: true\n{other}\n")
    assert "incompatible" in str(err.value) and other.split(":")[0] in str(err.value)


def test_hugepages_conflict_across_sources(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="enable_p2p comes from env LMCACHE_ENABLE_P2P"):
        load(tmp_path, "local_cpu_use_hugepages: true\n", LMCACHE_ENABLE_P2P="1")


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="malformed YAML at line 2"):
        load(tmp_path, "chunk_size: 256\nlocal_cpu: a: b\nprefetch: true\n")


def test_yaml_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level is a list; allowed: a mapping"):
        load(tmp_path, "- chunk_size\n")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        LMCacheEngineConfig.load(env={"LMCACHE_CONFIG_FILE": str(tmp_path / "nope.yaml")})


def test_upstream_file_loads_and_unknown_keys_warn_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = (
        "chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 5.0\n"
        "use_layerwise: false\nblend_special_str: ' # # '\nupstream_only_knob_xyz: 3\n"
    )
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        load(tmp_path, upstream)
        load(tmp_path, upstream)
    warned = [r.getMessage() for r in caplog.records if "upstream_only_knob_xyz" in r.getMessage()]
    assert len(warned) == 1 and "ignored" in warned[0]


def test_every_key_has_env_name_and_doc() -> None:
    for key in KEYS:
        assert key.env == "LMCACHE_" + key.name.upper() and key.doc


def test_disk_path_accepts_file_urls(tmp_path: Path) -> None:
    assert str(load(tmp_path, LMCACHE_LOCAL_DISK="file:///var/cache/kv/").local_disk_path) == (
        "/var/cache/kv"
    )
    assert str(load(tmp_path, LMCACHE_LOCAL_DISK="/tmp/x").local_disk_path) == "/tmp/x"


def test_remote_password_is_redacted(tmp_path: Path) -> None:
    config = load(tmp_path, LMCACHE_REMOTE_URL="valkey://user:hunter2@valkey:6379/0")
    shown = {key: value for key, value, _ in config.effective()}
    assert shown["remote_url"] == "valkey://user:***@valkey:6379/0"
    assert "hunter2" not in repr(config.effective())


def test_hugepage_arithmetic_and_message() -> None:
    assert pages_needed(5 * (1 << 30)) == 2560
    assert pages_needed(1) == 1 and pages_needed(2 << 20) == 1 and pages_needed((2 << 20) + 1) == 2
    text = shortfall_message(5 * (1 << 30), {"HugePages_Total": 100, "HugePages_Free": 10}, "env X")
    assert "2560" in text and "HugePages_Free: 10" in text and "sysctl -w vm.nr_hugepages" in text


def test_pool_larger_than_memory_names_the_key_and_bytes(tmp_path: Path) -> None:
    """Checked before touching a byte: committing more than the host has would get the
    process OOM-killed with no message at all."""
    from lmcache.memory.pool import MemoryPool, available_memory
    from lmcache.spec import KVSpec

    available = available_memory()
    assert available is not None
    size_gb = 2 * (available / (1 << 30)) + 1
    config = load(tmp_path, LMCACHE_MAX_LOCAL_CPU_SIZE=str(size_gb))
    with pytest.raises(ConfigError) as err:
        MemoryPool(config, KVSpec(2, 2, 8))
    message = str(err.value)
    assert message.startswith("max_local_cpu_size:") and "env LMCACHE_MAX_LOCAL_CPU_SIZE" in message
    assert str(int(size_gb * (1 << 30)) // (2 * 2 * 2 * 8 * 2 * 256) * 2 * 2 * 2 * 8 * 2 * 256) in (
        message
    )
