"""The configuration's keys, found by walking its dataclasses (so a key added later is
covered by the tests that use them), and YAML data that sets one."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

from fanoutd.config import CaptureConfig, Config


def int_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Every integer key (dotted: ring.block_count): the daemon's, and the capture keys
    (which the file sets at its top level too)."""
    if cls is None:
        return int_keys(CaptureConfig) + int_keys(Config)
    keys = []
    for f in fields(cls):
        default = getattr(cls(), f.name)
        if is_dataclass(default):
            keys += int_keys(type(default), f"{prefix}{f.name}.")
        elif f.type in (int, int | None):
            keys.append(prefix + f.name)
    return keys


def nested(key: str, value: Any) -> dict:
    """{"a": {"b": value}} for "a.b"."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def merged(base: dict, over: dict) -> dict:
    """over on top of base, section by section."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = merged(out[key], value)
        out[key] = value
    return out
