"""The CRD's `lmcache.extraConfig` schema is the engine's own key list, types and bounds: generated
by `make crd-engine-schema` from `lmcache config-reference --format json-schema`, and this test
fails when the committed CRD (or the operator's copy of the keys) lags behind the engine."""

from __future__ import annotations

import json
import subprocess
import sys

import chartctl
import yaml

from lmcache import config


def test_crd_and_operator_keys_match_the_engine() -> None:
    assert chartctl.engine_schema(update=False) == [], "run `make crd-engine-schema`"


def test_json_schema_carries_every_key_with_its_type_and_bounds() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lmcache", "config-reference", "--format", "json-schema"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    properties = json.loads(out)["properties"]
    assert set(properties) == {k.name for k in config.KEYS}
    for key in config.KEYS:
        schema = properties[key.name]
        assert schema["type"] == key.kind.value, key.name
        assert schema.get("minimum") == key.minimum, key.name
        assert schema.get("maximum") == key.maximum, key.name
        assert schema.get("exclusiveMinimum", False) == key.exclusive_minimum, key.name
        assert schema.get("nullable", False) == key.nullable, key.name
        assert "default" not in schema  # a CRD default would be stored in every object


def test_a_new_engine_key_reaches_the_crd() -> None:
    """Re-running the generator is all a new key or bound needs."""
    schema = {
        "properties": {
            "new_knob": {"type": "integer", "minimum": 2, "maximum": 9},
            "chunk_size": {"type": "integer", "minimum": 1},
        }
    }
    node = chartctl.extra_config_node(schema, {"chunk_size": "lmcache.chunkSize"})
    assert node["properties"] == schema["properties"]
    assert node["x-kubernetes-validations"][0]["rule"] == "!has(self.chunk_size)"
    text = chartctl.crd_with_engine_schema(chartctl.CRD.read_text(), node)
    crd = yaml.safe_load(text)
    lmcache = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["lmcache"]
    assert lmcache["properties"]["extraConfig"]["properties"] == schema["properties"]
    assert chartctl.SCHEMA_BEGIN in text and chartctl.SCHEMA_END in text


def test_operator_keys_are_the_engines() -> None:
    from lmcache_operator import spec

    assert set(spec.ENGINE_KEYS) == set(config.KEYS_BY_NAME)
