"""``--help``'s listing of the config keys: each key's type and the value a command line runs with, beside the
schema's default where they differ."""

from __future__ import annotations

from dataclasses import MISSING as _NO_FACTORY
from dataclasses import fields, is_dataclass
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf


def help_text(schema_cls: type, values: Any = None, prefix: str = "") -> str:
    """One line per config key, for ``--help``: ``key: type = default``, or with ``values`` (a loaded config,
    presets and overrides merged) ``key: type = value``, followed by the schema's default where they differ."""
    lines: list[str] = []
    for f in fields(schema_cls):
        default = f.default if f.default_factory is _NO_FACTORY else f.default_factory()  # type: ignore[misc]
        if is_dataclass(default):
            lines.append(help_text(type(default), values, prefix + f.name + "."))
            continue
        shown = "???" if default == MISSING else repr(default)
        now = shown
        if values is not None:
            parent = OmegaConf.select(values, prefix[:-1]) if prefix else values
            if OmegaConf.is_missing(parent, f.name):  # required here, though the schema may not require it
                now = "???"
            else:
                value = OmegaConf.select(values, prefix + f.name)
                value = OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value
                if value != default:
                    now = repr(value)
        lines.append(f"  {prefix}{f.name}: {_type_name(f.type)} = {now}"
                     + (f"  (schema default: {shown})" if now != shown else ""))
    return "\n".join(lines)


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "")

