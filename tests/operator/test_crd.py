"""The CRD: a structural schema, CEL rules that refuse bad objects, defaults that agree with
the operator's, and examples that pass it all.

CEL is evaluated with cel-python after the same structural defaulting the API server does;
the e2e suite checks the file against a real kube-apiserver as well.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import celpy
import jsonschema
import pytest
import yaml
from lmcache_operator import api
from lmcache_operator import spec as spec_mod

from tests.operator.fakes import EXAMPLES, apply_defaults, crd_schema, load_crd
from tests.operator.invalid_specs import INVALID

SPEC_SCHEMA = crd_schema()["properties"]["spec"]


def walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def test_names_match_the_operator() -> None:
    crd = load_crd()
    assert crd["metadata"]["name"] == f"{api.PLURAL}.{api.GROUP}"
    assert crd["spec"]["group"] == api.GROUP
    assert crd["spec"]["names"]["kind"] == api.KIND
    assert crd["spec"]["names"]["shortNames"] == ["lmcd"]
    assert crd["spec"]["scope"] == "Namespaced"
    version = crd["spec"]["versions"][0]
    assert version["name"] == api.VERSION
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert "status" in version["subresources"]
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Model", "Replicas", "Ready", "CPU-Cache-GB", "Hugepages", "Valkey", "Age"} <= columns


def test_schema_is_structural() -> None:
    """Every node has a type (or is int-or-string / preserve-unknown-fields), and no node
    mixes properties with additionalProperties: the API server's structural rules."""
    for path, node in walk(crd_schema()):
        special = node.get("x-kubernetes-int-or-string") or node.get(
            "x-kubernetes-preserve-unknown-fields"
        )
        assert "type" in node or special, f"{path or '<root>'} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        if "default" in node and node.get("type") == "object":
            assert isinstance(node["default"], dict), path
        for banned in ("$ref", "definitions", "dependencies", "patternProperties"):
            assert banned not in node, f"{path}: {banned} is not allowed"


def test_defaults_validate_against_their_own_schema() -> None:
    for path, node in walk(crd_schema()):
        if "default" in node:
            errors = list(Draft(_openapi_to_jsonschema(node)).iter_errors(node["default"]))
            assert errors == [], f"{path}: default {node['default']!r}: {errors}"


def test_no_engine_image_default_is_stored_in_objects() -> None:
    """A default in the CRD is written into every object at creation, so an operator
    upgrade would never move existing deployments to its new engine image."""
    image = SPEC_SCHEMA["properties"]["image"]["properties"]
    assert "default" not in image["repository"] and "default" not in image["tag"]
    memory = SPEC_SCHEMA["properties"]["resources"]["properties"]["memory"]
    assert "default" not in memory  # it depends on tensorParallelSize


def test_python_defaults_equal_crd_defaults() -> None:
    """The reconciler sees the same spec whether or not the API server defaulted it."""
    bare = spec_mod.parse({"model": "m"})
    defaulted = spec_mod.parse(apply_defaults(SPEC_SCHEMA, {"model": "m"}))
    assert bare == defaulted


# --- CEL -------------------------------------------------------------------------------------

_CEL = celpy.Environment()


def cel_errors(spec: dict[str, Any]) -> list[str]:
    """The messages of every CEL rule the (defaulted) spec breaks, walking the schema."""
    found: list[str] = []

    def visit(schema: dict[str, Any], value: Any) -> None:
        for rule in schema.get("x-kubernetes-validations") or []:
            program = _CEL.program(_CEL.compile(rule["rule"]))
            if not program.evaluate({"self": celpy.json_to_cel(value)}):
                found.append(rule["message"])
        if isinstance(value, dict):
            for name, sub in (schema.get("properties") or {}).items():
                if name in value:
                    visit(sub, value[name])

    visit(SPEC_SCHEMA, as_schema_types(SPEC_SCHEMA, apply_defaults(SPEC_SCHEMA, spec)))
    return found


def as_schema_types(schema: dict[str, Any], value: Any) -> Any:
    """CEL sees a `number` field as a double even when the JSON held an integer."""
    if schema.get("type") == "number" and isinstance(value, int):
        return float(value)
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        return {k: as_schema_types(props.get(k, {}), v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_schema_types(schema.get("items") or {}, v) for v in value]
    return value


def schema_errors(spec: dict[str, Any]) -> list[str]:
    validator = Draft(_openapi_to_jsonschema(SPEC_SCHEMA))
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(apply_defaults(SPEC_SCHEMA, spec))
    ]


Draft = jsonschema.Draft4Validator  # OpenAPI v3.0 uses draft-4 style exclusiveMinimum


def _openapi_to_jsonschema(schema: Any) -> Any:
    """Drop the x- extensions, let int-or-string accept both and `nullable` accept null, and
    refuse undeclared fields, as the API server does under strict field validation (kubectl's
    default, and always for server-side apply)."""
    if isinstance(schema, dict):
        out = {k: _openapi_to_jsonschema(v) for k, v in schema.items() if not k.startswith("x-")}
        if schema.get("x-kubernetes-int-or-string"):
            out["type"] = ["integer", "string"]
        if schema.get("nullable") and isinstance(schema.get("type"), str):
            out["type"] = [schema["type"], "null"]
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        if "properties" in out and isinstance(out["properties"], dict):
            out["properties"] = {
                k: _openapi_to_jsonschema(v) for k, v in schema["properties"].items()
            }
        return out
    if isinstance(schema, list):
        return [_openapi_to_jsonschema(v) for v in schema]
    return schema


def test_every_cel_rule_has_a_case() -> None:
    """Each rule's own message carries one of the cases' messages (the cases run here and
    against a real API server in the e2e tests)."""
    messages = {message for _, message, _ in INVALID.values()}
    for path, node in walk(crd_schema()):
        for rule in node.get("x-kubernetes-validations") or []:
            assert any(m in rule["message"] for m in messages), f"no INVALID case for {path}"


@pytest.mark.parametrize("case", sorted(INVALID))
def test_cel_refuses(case: str) -> None:
    spec, message, _ = INVALID[case]
    errors = cel_errors({"model": "m", **spec})
    assert any(message in e for e in errors), errors


@pytest.mark.parametrize(
    "spec",
    [
        {"lmcache": {"hugepages": {"enabled": True}, "extraConfig": {"enable_p2p": False}}},
        {"lmcache": {"hugepages": {"enabled": False}, "extraConfig": {"shm_name": "x"}}},
        {"lmcache": {"localDisk": {"enabled": False}}},
        {"valkey": {"enabled": False}, "remote": {"url": "redis://x:6379"}},
        {"metrics": {"enabled": False, "port": 8000}},
        {"kvEvents": {"enabled": False, "port": 8000}},
        {"kvEvents": {"enabled": True, "port": 9090}, "metrics": {"enabled": False}},
        {"strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}},
        {"strategy": {"rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "0%"}}},
        {"strategy": {"type": "Recreate"}},
        {
            "lmcache": {
                "extraConfig": {
                    "save_unfull_chunk": False,
                    "remote_breaker_backoff_s": 2,  # an integer is a number too
                    "remote_write_queue_size": 0.5,
                    "remote_ttl_s": 3600,
                    "remote_serde": "naive",
                }
            }
        },
    ],
)
def test_cel_accepts(spec: dict[str, Any]) -> None:
    assert cel_errors({"model": "m", **spec}) == []


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"lmcache": {"maxLocalCpuSize": 0}}, "lmcache.maxLocalCpuSize"),
        ({"lmcache": {"maxLocalCpuSize": -1}}, "lmcache.maxLocalCpuSize"),
        ({"replicas": -1}, "replicas"),
        ({"vllm": {"tensorParallelSize": 0}}, "vllm.tensorParallelSize"),
        ({"vllm": {"gpuMemoryUtilization": 1.5}}, "vllm.gpuMemoryUtilization"),
        ({"service": {"type": "ExternalName"}}, "service.type"),
        ({"image": {"pullPolicy": "Sometimes"}}, "image.pullPolicy"),
        ({"remote": {"url": "http://x"}}, "remote.url"),
        (
            {"lmcache": {"localDisk": {"enabled": True, "size": 1, "path": "relative"}}},
            "lmcache.localDisk.path",
        ),
        # The engine's own keys, types and bounds (generated from `lmcache config-reference`).
        ({"lmcache": {"extraConfig": {"chunk_sise": 128}}}, "lmcache.extraConfig"),
        (
            {"lmcache": {"extraConfig": {"remote_timeout_ms": 0}}},
            "lmcache.extraConfig.remote_timeout_ms",
        ),
        (
            {"lmcache": {"extraConfig": {"save_unfull_chunk": "yes"}}},
            "lmcache.extraConfig.save_unfull_chunk",
        ),
        (
            {"lmcache": {"extraConfig": {"remote_serde": "pickle"}}},
            "lmcache.extraConfig.remote_serde",
        ),
        (
            {"lmcache": {"extraConfig": {"remote_breaker_backoff_s": 0}}},
            "lmcache.extraConfig.remote_breaker_backoff_s",
        ),
    ],
)
def test_schema_refuses_naming_the_field(spec: dict[str, Any], field: str) -> None:
    errors = schema_errors({"model": "m", **spec})
    assert any(e.startswith(field + ":") for e in errors), errors


def test_model_is_required() -> None:
    assert any("'model' is a required property" in e for e in schema_errors({}))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_schema_cel_and_operator_checks(path: Any) -> None:
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == api.API_VERSION and doc["kind"] == api.KIND
    assert schema_errors(doc["spec"]) == []
    assert cel_errors(doc["spec"]) == []
    spec = spec_mod.parse(apply_defaults(SPEC_SCHEMA, copy.deepcopy(doc["spec"])))
    assert spec_mod.problems(spec) == []


def test_there_are_examples_for_each_mode() -> None:
    names = {p.name for p in EXAMPLES}
    assert {
        "lmcachedeployment-minimal.yaml",
        "lmcachedeployment-hugepages.yaml",
        "lmcachedeployment-valkey.yaml",
        "lmcachedeployment-remote-disk.yaml",
    } <= names


def test_cel_rules_hold_on_bare_defaults() -> None:
    """The API server checks each `default` against the rules of its node *without* nested
    defaulting; a rule that reads a field the default lacks makes the CRD itself invalid."""
    for path, node in walk(crd_schema()):
        if "default" in node:
            for rule in node.get("x-kubernetes-validations") or []:
                program = _CEL.program(_CEL.compile(rule["rule"]))
                value = as_schema_types(node, node["default"])
                assert program.evaluate({"self": celpy.json_to_cel(value)}), (path, rule)
