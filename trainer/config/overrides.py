"""A run config from YAML plus `key=value` overrides (`load_config`, `config_from_dict`), and back out
as plain data (`to_dict`, `to_yaml`, `flatten`).

Overrides are typed like the file: `train.max_steps=7` is an integer, `optim.betas=[0.9, 0.95]` a list,
and a string field takes the text literally (`run_name=007` stays "007"). An override goes through the
very same validation as the file, so a typo in either ends in the same one-line error.
"""
from __future__ import annotations

import json
import os
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from data.config_model import unknown_key_message
from trainer.config.sections import TrainConfig


def _field_annotation(path: list[str]) -> Any:
    """The declared type of a dotted key, raising the unknown-key error for a bad segment."""
    node: Any = TrainConfig
    where = ""
    for part in path:
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            raise ValueError(f"{where} is a single value, it has no key {part!r}")
        if part not in node.model_fields:
            raise ValueError(unknown_key_message(part, where, list(node.model_fields)))
        node = node.model_fields[part].annotation
        where = f"{where}.{part}" if where else part
    return node


def _is_text(annotation: Any) -> bool:
    return annotation is str or (typing.get_origin(annotation) is Literal
                                 and all(isinstance(a, str) for a in typing.get_args(annotation)))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], typed value). Strings need no quotes."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {text!r} is not valid: expected key=value, e.g. optim.lr=3e-4")
    path = key.split(".")
    annotation = _field_annotation(path)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        raise ValueError(f"override {key!r} names a whole section: set one of its keys, e.g. {key}.<key>=value")
    if _is_text(annotation):
        value: Any = raw  # strings are taken literally: run_name=007 stays "007"
    else:
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ValueError(f"override {text!r}: cannot parse the value ({err})") from None
    return path, value


def _apply(raw: dict, path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def config_from_dict(raw: dict, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Validate a config mapping after applying `key=value` overrides; a bad key or value: one ValueError."""
    raw = json.loads(json.dumps(raw or {}, default=list))  # a deep copy we may edit
    if not isinstance(raw, dict):
        raise ValueError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    for text in overrides:
        path, value = parse_override(text)
        _apply(raw, path, value)
    return TrainConfig.from_dict(raw)


def load_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config, apply `key=value` overrides, validate everything."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config must be a mapping of sections, got {type(raw).__name__}")
    try:
        return config_from_dict(raw, overrides)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def to_dict(cfg: TrainConfig) -> dict:
    """Plain YAML/JSON types (tuples become lists), in the order the sections declare their keys."""
    return cfg.model_dump(mode="json")


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: TrainConfig) -> dict[str, str]:
    """{"optim.lr": "0.0001", ...}: MLflow params."""
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        else:
            flat[prefix] = json.dumps(node) if isinstance(node, list) else str(node)

    walk(to_dict(cfg), "")
    return flat
