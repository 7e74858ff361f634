"""The report's JSON Schema (shipped in the package) and a validator for the subset of JSON
Schema it uses: type, const, enum, required, properties, additionalProperties, items and local
``$ref`` (no third-party dependency)."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

SCHEMA_FILE = "report-v2.schema.json"
_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
    "integer": (int,), "number": (int, float), "null": (type(None),)}
SUPPORTED = {"$schema", "$id", "title", "description", "type", "const", "enum", "required",
             "properties", "additionalProperties", "items", "$ref", "$defs"}


@lru_cache(maxsize=1)
def report_schema() -> dict[str, Any]:
    """The schema-version-2 report schema."""
    text = resources.files("poisonguard.schemas").joinpath(SCHEMA_FILE).read_text("utf-8")
    return json.loads(text)


def _type_ok(value: Any, name: str) -> bool:
    if isinstance(value, bool) and name in ("integer", "number"):
        return False
    return isinstance(value, _TYPES[name])


def validate(instance: Any, schema: dict[str, Any] | None = None) -> list[str]:
    """Every violation of ``schema`` (default: the report schema) as ``path: problem``."""
    root = schema or report_schema()
    errors: list[str] = []
    _check(instance, root, root, "$", errors)
    return errors


def _check(value: Any, node: dict[str, Any], root: dict[str, Any], path: str,
           errors: list[str]) -> None:
    unknown = set(node) - SUPPORTED
    if unknown:
        raise ValueError(f"schema keyword(s) {sorted(unknown)} at {path} are not supported")
    if "$ref" in node:
        ref = node["$ref"]
        if not ref.startswith("#/"):
            raise ValueError(f"only local $ref is supported, got {ref!r}")
        target: Any = root
        for part in ref[2:].split("/"):
            target = target[part]
        _check(value, target, root, path, errors)
    if "type" in node:
        names = node["type"] if isinstance(node["type"], list) else [node["type"]]
        if not any(_type_ok(value, n) for n in names):
            errors.append(f"{path}: expected {' or '.join(names)}, got {type(value).__name__}")
            return
    if "const" in node and value != node["const"]:
        errors.append(f"{path}: expected {node['const']!r}, got {value!r}")
    if "enum" in node and value not in node["enum"]:
        errors.append(f"{path}: {value!r} is not one of {node['enum']}")
    if isinstance(value, dict):
        for key in node.get("required", []):
            if key not in value:
                errors.append(f"{path}: missing {key!r}")
        props = node.get("properties", {})
        extra = node.get("additionalProperties", True)
        for key, sub in value.items():
            if key in props:
                _check(sub, props[key], root, f"{path}.{key}", errors)
            elif extra is False:
                errors.append(f"{path}: unexpected key {key!r}")
            elif isinstance(extra, dict):
                _check(sub, extra, root, f"{path}.{key}", errors)
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, item in enumerate(value):
            _check(item, node["items"], root, f"{path}[{i}]", errors)
