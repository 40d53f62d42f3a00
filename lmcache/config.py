"""Engine configuration: defaults < YAML file (``LMCACHE_CONFIG_FILE``) < ``LMCACHE_*`` env.

Every value remembers where it came from, so an error (and ``lmcache check-config``) can name
the exact file or variable to fix. All validation happens here, before any memory is allocated.
"""

from __future__ import annotations

import enum
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

logger = logging.getLogger("lmcache")

ENV_PREFIX = "LMCACHE_"
CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"
GB = 1 << 30
"""LMCache sizes are in "GB" of 2^30 bytes."""

# Env vars under LMCACHE_ that are not config keys but are read elsewhere.
_NON_KEY_ENV = frozenset(
    {CONFIG_FILE_ENV, "LMCACHE_REMOTE_USERNAME", "LMCACHE_REMOTE_PASSWORD", "LMCACHE_LOG_LEVEL"}
)
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
REMOTE_SCHEMES = ("valkey", "valkeys", "redis", "rediss", "unix")
REMOTE_SERDES = ("naive",)


class ConfigError(ValueError):
    """A bad configuration value: names the key, its source and what is allowed."""


@dataclass(frozen=True)
class Source:
    """Where a value came from: ``default``, ``file <path>``, ``env <NAME>`` or ``override``."""

    kind: str
    where: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.where}".strip()


DEFAULT = Source("default")


class Kind(enum.Enum):
    """A key's value type, named as in JSON Schema (the CRD's schema is generated from these)."""

    BOOLEAN = "boolean"
    INTEGER = "integer"
    NUMBER = "number"
    STRING = "string"


_ALLOWED_TYPE = {
    Kind.BOOLEAN: "a boolean: true/false, 1/0, yes/no (any case)",
    Kind.INTEGER: "an integer",
    Kind.NUMBER: "a number",
    Kind.STRING: "a string",
}


def _parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError(_ALLOWED_TYPE[Kind.BOOLEAN])


def _parse_int(raw: Any) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str):
        text = raw.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:  # "1e18": YAML 1.1 and env vars leave exponent forms as strings
            value = float(text)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value.is_integer():
            return int(value)
    raise ValueError(_ALLOWED_TYPE[Kind.INTEGER])


def _parse_float(raw: Any) -> float:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(_ALLOWED_TYPE[Kind.NUMBER]) from None
    else:
        raise ValueError(_ALLOWED_TYPE[Kind.NUMBER])
    if not math.isfinite(value):
        raise ValueError("a finite number")
    return value


def _parse_str(raw: Any) -> str:
    """Strings only: a YAML list or mapping under a path key is a mistake, not a path."""
    if isinstance(raw, str):
        return raw.strip()
    if isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw)
    raise ValueError(_ALLOWED_TYPE[Kind.STRING])


_PARSERS: dict[Kind, Callable[[Any], Any]] = {
    Kind.BOOLEAN: _parse_bool,
    Kind.INTEGER: _parse_int,
    Kind.NUMBER: _parse_float,
    Kind.STRING: _parse_str,
}


def _remote_url(value: str) -> str | None:
    scheme = urlsplit(value).scheme
    if scheme not in REMOTE_SCHEMES:
        return "a URL with scheme " + ", ".join(f"{s}://" for s in REMOTE_SCHEMES)
    return None


@dataclass(frozen=True)
class KeySpec:
    """One config key: its type, bounds, default and one line of documentation.

    The bounds are part of the contract, not just checks: they keep every later computation
    (pool bytes, socket deadlines) in range, and the operator's CRD schema is generated from
    them so the API server refuses what the engine would."""

    name: str
    kind: Kind
    default: Any
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    nullable: bool = False
    choices: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def parse(self, raw: Any) -> Any:
        """The typed value of ``raw``; ValueError says what is allowed."""
        if raw is None or (self.nullable and isinstance(raw, str) and not raw.strip()):
            if self.nullable:
                return None
            raise ValueError(_ALLOWED_TYPE[self.kind])
        value = _PARSERS[self.kind](raw)
        if self.kind is Kind.STRING and not value and self.nullable:
            return None
        problem = self._problem(value)
        if problem:
            raise ValueError(problem)
        return value

    def _problem(self, value: Any) -> str | None:
        if self.choices and value not in self.choices:
            return "one of: " + ", ".join(self.choices)
        if self.minimum is not None or self.maximum is not None:
            below = self.minimum is not None and (
                value <= self.minimum if self.exclusive_minimum else value < self.minimum
            )
            above = self.maximum is not None and value > self.maximum
            if below or above:
                return self.allowed_range()
        return self.check(value) if self.check else None

    def allowed_range(self) -> str:
        noun = "an integer" if self.kind is Kind.INTEGER else "a number"
        sign = ">" if self.exclusive_minimum else ">="
        low = "" if self.minimum is None else f"{sign} {self.minimum:g}"
        high = "" if self.maximum is None else f"<= {self.maximum:g}"
        return f"{noun} {' and '.join(p for p in (low, high) if p)}"


MAX_POOL_GB = 65536.0
"""64 TiB: far above any host, low enough that byte counts stay exact."""
MAX_DISK_GB = 1 << 20
"""1 PiB of local disk."""

KEYS: tuple[KeySpec, ...] = (
    KeySpec(
        "chunk_size",
        Kind.INTEGER,
        256,
        "tokens per KV chunk (the unit of hashing and storage)",
        minimum=1,
        maximum=1 << 16,
    ),
    KeySpec(
        "local_cpu",
        Kind.BOOLEAN,
        True,
        "keep KV in the pinned CPU pool as an LRU hot cache (the pool exists either way)",
    ),
    KeySpec(
        "max_local_cpu_size",
        Kind.NUMBER,
        5.0,
        "pinned CPU pool size in GB (2^30 bytes); also the staging buffer for disk/remote",
        minimum=0,
        exclusive_minimum=True,
        maximum=MAX_POOL_GB,
    ),
    KeySpec(
        "local_cpu_use_hugepages",
        Kind.BOOLEAN,
        False,
        "back the pool with 2 MiB hugepages (needs vm.nr_hugepages; CUDA platforms only)",
    ),
    KeySpec(
        "enable_p2p",
        Kind.BOOLEAN,
        False,
        "P2P KV sharing between instances (not implemented; incompatible with hugepages)",
    ),
    KeySpec(
        "shm_name",
        Kind.STRING,
        None,
        "shared-memory pool name (not implemented; incompatible with hugepages)",
        nullable=True,
    ),
    KeySpec(
        "local_disk",
        Kind.STRING,
        None,
        "directory of the local disk tier (plain path or file:// URL); unset = no disk tier",
        nullable=True,
    ),
    KeySpec(
        "max_local_disk_size",
        Kind.NUMBER,
        0.0,
        "disk tier size in GB (2^30 bytes); LRU-evicted beyond it",
        minimum=0,
        maximum=MAX_DISK_GB,
    ),
    KeySpec(
        "remote_url",
        Kind.STRING,
        None,
        "remote tier: valkey://host:port[/db], redis://, valkeys://, rediss://, unix://path",
        nullable=True,
        check=_remote_url,
    ),
    KeySpec(
        "remote_serde",
        Kind.STRING,
        "naive",
        "remote value encoding: naive = raw bytes behind a checked header",
        choices=REMOTE_SERDES,
    ),
    KeySpec(
        "remote_timeout_ms",
        Kind.INTEGER,
        50,
        "remote deadline of a lookup; a load adds 0.17 s per 32 MiB (200 MB/s floor)",
        minimum=1,
        maximum=60_000,
    ),
    KeySpec(
        "remote_write_timeout_ms",
        Kind.INTEGER,
        5000,
        "deadline of one background batch of remote writes",
        minimum=1,
        maximum=600_000,
    ),
    KeySpec(
        "remote_ttl_s",
        Kind.INTEGER,
        None,
        "expire remote values after this many seconds (unset = until the server evicts them)",
        minimum=1,
        maximum=10 * 365 * 86400,
        nullable=True,
    ),
    KeySpec(
        "remote_write_queue_size",
        Kind.NUMBER,
        1.0,
        "GB (2^30 bytes) of pool slots queued remote writes may pin; beyond it writes drop",
        minimum=0,
        exclusive_minimum=True,
        maximum=MAX_POOL_GB,
    ),
    KeySpec(
        "remote_breaker_failures",
        Kind.INTEGER,
        3,
        "consecutive remote failures that open the circuit breaker (tier skipped)",
        minimum=1,
        maximum=1_000_000,
    ),
    KeySpec(
        "remote_breaker_backoff_s",
        Kind.NUMBER,
        5.0,
        "while the breaker is open, probe the remote server this often (seconds)",
        minimum=0,
        exclusive_minimum=True,
        maximum=3600,
    ),
    KeySpec(
        "max_stage_wait_ms",
        Kind.INTEGER,
        1000,
        "vLLM: how long a request may wait for its disk/remote hits to be staged into the "
        "pool before it runs with what is in CPU (the rest is computed)",
        minimum=0,
        maximum=600_000,
    ),
    KeySpec(
        "save_unfull_chunk",
        Kind.BOOLEAN,
        True,
        "also store the trailing partial chunk of a prompt (as in the seed's example log)",
    ),
    KeySpec(
        "prefetch",
        Kind.BOOLEAN,
        False,
        "a lookup that finds chunks on disk/remote starts loading them into CPU at once",
    ),
    KeySpec(
        "metrics_port",
        Kind.INTEGER,
        None,
        "serve Prometheus metrics on this port from TP rank 0, every rank's when the ranks "
        "share PROMETHEUS_MULTIPROC_DIR (unset = no HTTP endpoint)",
        minimum=1,
        maximum=65535,
        nullable=True,
    ),
)
KEYS_BY_NAME: Mapping[str, KeySpec] = {k.name: k for k in KEYS}

_warned_unknown: set[str] = set()


def _warn_unknown_once(name: str, source: Source) -> None:
    if name in _warned_unknown:
        return
    _warned_unknown.add(name)
    logger.warning(
        "LMCache config key %r (%s) is not implemented by this engine; ignored", name, source
    )


@dataclass(frozen=True)
class LMCacheEngineConfig:
    """Effective engine settings; build with :meth:`load` (or :meth:`from_mapping` in code)."""

    chunk_size: int = 256
    local_cpu: bool = True
    max_local_cpu_size: float = 5.0
    local_cpu_use_hugepages: bool = False
    enable_p2p: bool = False
    shm_name: str | None = None
    local_disk: str | None = None
    max_local_disk_size: float = 0.0
    remote_url: str | None = None
    remote_serde: str = "naive"
    remote_timeout_ms: int = 50
    remote_write_timeout_ms: int = 5000
    remote_ttl_s: int | None = None
    remote_write_queue_size: float = 1.0
    remote_breaker_failures: int = 3
    remote_breaker_backoff_s: float = 5.0
    max_stage_wait_ms: int = 1000
    save_unfull_chunk: bool = True
    prefetch: bool = False
    metrics_port: int | None = None
    sources: Mapping[str, Source] = field(default_factory=dict, compare=False, repr=False)

    @property
    def max_local_cpu_bytes(self) -> int:
        return int(self.max_local_cpu_size * GB)

    @property
    def max_local_disk_bytes(self) -> int:
        return int(self.max_local_disk_size * GB)

    @property
    def local_disk_path(self) -> Path | None:
        """``local_disk`` as a directory, accepting upstream's ``file:///path`` form."""
        if self.local_disk is None:
            return None
        if self.local_disk.startswith("file://"):
            return Path(urlsplit(self.local_disk).path)
        return Path(self.local_disk)

    def source_of(self, key: str) -> Source:
        return self.sources.get(key, DEFAULT)

    @classmethod
    def load(
        cls,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        overrides_source: str = "override",
    ) -> LMCacheEngineConfig:
        """Defaults < ``LMCACHE_CONFIG_FILE`` < ``LMCACHE_*`` env < ``overrides``."""
        env = os.environ if env is None else env
        layers: list[tuple[Source, Mapping[str, Any]]] = []
        path = env.get(CONFIG_FILE_ENV)
        if path:
            layers.append((Source("file", path), _read_yaml(Path(path))))
        for name, value in env.items():
            if not name.startswith(ENV_PREFIX) or name in _NON_KEY_ENV:
                continue
            key = name[len(ENV_PREFIX) :].lower()
            layers.append((Source("env", name), {key: value}))
        if overrides:
            layers.append((Source(overrides_source), overrides))
        return cls._from_layers(layers)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "code") -> LMCacheEngineConfig:
        """Config from a plain mapping (tests, embedding), validated like :meth:`load`."""
        return cls._from_layers([(Source(source), values)])

    @classmethod
    def _from_layers(cls, layers: list[tuple[Source, Mapping[str, Any]]]) -> LMCacheEngineConfig:
        values: dict[str, Any] = {}
        sources: dict[str, Source] = {}
        for source, mapping in layers:
            for name, raw in mapping.items():
                spec = KEYS_BY_NAME.get(str(name))
                if spec is None:
                    _warn_unknown_once(str(name), source)
                    continue
                values[spec.name] = _parse(spec, raw, source)
                sources[spec.name] = source
        config = cls(**values, sources=sources)
        config._check_combinations()
        return config

    def _check_combinations(self) -> None:
        if not self.local_cpu_use_hugepages:
            return
        if self.enable_p2p:
            raise ConfigError(self._conflict("enable_p2p", "P2P mode"))
        if self.shm_name:
            raise ConfigError(self._conflict("shm_name", "shared memory (shm_name set)"))

    def _conflict(self, other: str, what: str) -> str:
        return (
            f"local_cpu_use_hugepages=true ({self.source_of('local_cpu_use_hugepages')}) is "
            f"incompatible with {what}: {other} comes from {self.source_of(other)}; "
            f"allowed: disable one of them"
        )

    def effective(self) -> list[tuple[str, Any, Source]]:
        """(key, value, source) for every key, secrets in ``remote_url`` redacted."""
        rows = []
        for spec in KEYS:
            value = getattr(self, spec.name)
            if spec.name == "remote_url" and value:
                value = redact_url(value)
            rows.append((spec.name, value, self.source_of(spec.name)))
        return rows


def _parse(spec: KeySpec, raw: Any, source: Source) -> Any:
    try:
        return spec.parse(raw)
    except ValueError as err:
        raise ConfigError(
            f"{spec.name}: invalid value {_show(spec, raw)} from {source}; allowed: {err}"
        ) from None


def _show(spec: KeySpec, raw: Any) -> str:
    if spec.name == "remote_url":
        return repr(redact_url(str(raw)))
    shown = repr(raw)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def redact_url(url: str) -> str:
    """The URL with any password replaced, safe for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return parts._replace(netloc=f"{user}:***@{host}{port}").geturl()


MAX_CONFIG_BYTES = 1 << 20
"""A config file is a few hundred bytes; anything near this is not one."""


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader without aliases: a config needs none, and nested aliases (a "billion
    laughs" file) would expand to gigabytes before any key could be checked."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed", self.peek_event().start_mark
            )
        return super().compose_node(parent, index)


def _read_yaml(path: Path) -> Mapping[str, Any]:
    where = f"{CONFIG_FILE_ENV}={path}"
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"config file {path} (named by {where}) is over {MAX_CONFIG_BYTES} bytes; "
                f"allowed: a YAML mapping of LMCache keys"
            )
        text = raw.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} (named by {where}) is not UTF-8 text") from None
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path} (named by {where})") from None
    except OSError as err:
        raise ConfigError(f"config file unreadable: {path} (named by {where}): {err}") from None
    try:
        data = yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"config file {path}: malformed YAML{line}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: top level is a {type(data).__name__}; allowed: a mapping of "
            f"LMCache keys (e.g. 'chunk_size: 256')"
        )
    return data
