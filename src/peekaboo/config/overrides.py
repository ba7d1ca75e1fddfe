"""Building a config: YAML presets and groups, ``key=value`` overrides, and the config written back out.

The presets ship inside the package (``peekaboo/configs/``, which the repository's ``configs/`` links to), so
``peekaboo-predict`` run from any folder behaves as ``predict.py`` in the repository; ``PEEKABOO_CONFIG_DIR``
points at a folder of one's own instead (:func:`preset_dir`). In that folder:

- ``configs/<task>.yaml`` (``predict.yaml``, ``train.yaml``) is read first;
- a group selection on the command line, ``model=sd15`` or ``data=voc``, merges ``configs/model/sd15.yaml``
  (its keys are rooted at the top level, so a model preset can also set the mask or guidance that suit it);
- then every ``key=value`` override, in order. Repeating a list key (``prompt=a prompt=b``) appends.

Unknown keys and values of the wrong type are :class:`~peekaboo.errors.ConfigError` naming the key (a retired
key names its replacement); range checks live in :mod:`peekaboo.config.validation`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode, StringNode, ValueNode

from peekaboo.config.schema import PredictConfig, TrainConfig
from peekaboo.config.validation import validate
from peekaboo.errors import ConfigError

# Lightning config groups that a ``group=name`` override selects from ``configs/<group>/<name>.yaml``.
GROUPS = ("model", "data")
# Environment variable naming a folder of presets that replaces the packaged ones.
CONFIG_DIR_ENV = "PEEKABOO_CONFIG_DIR"
# Keys that no longer exist -> what to write instead, for the error that names them (on the command line, in a
# preset or in apply_overrides); any other unknown key gets the closest valid keys.
RETIRED_KEYS = {
    "run.tensorboard": "use run.logger=none to log nothing (or run.logger=tensorboard): run.logger is the one "
                       "logging switch",
    # The dds estimator and DDIM-inversion noise lost to sds and fresh noise in every measurement.
    "optimization.guidance.dds_reference": "it belonged to guidance.estimator=dds; use estimator=sds or nfsd",
    "optimization.guidance.inversion_steps": "it belonged to guidance.noise=ddim_inversion; drop it",
    "optimization.guidance.inversion_guidance_scale": "it belonged to guidance.noise=ddim_inversion; drop it",
    # Never read: the files under data.root define which RefCOCO variant a run uses.
    "data.dataset": "the RefCOCO files under data.root define the variant; drop it",
}

C = TypeVar("C")


def preset_dir() -> Path:
    """The folder of YAML presets: ``$PEEKABOO_CONFIG_DIR`` if set, else the presets inside the package."""
    env = os.environ.get(CONFIG_DIR_ENV)
    return Path(env) if env else Path(str(resources.files("peekaboo") / "configs"))


def _group_files(config_dir: Path, argv: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Split ``group=name`` selections (whose YAML exists) from ordinary overrides."""
    files, rest = [], []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in GROUPS and "." not in value and "/" not in value:
            path = config_dir / key / f"{value}.yaml"
            if not path.is_file():
                choices = sorted(p.stem for p in (config_dir / key).glob("*.yaml"))
                raise ConfigError(f"{key}={value}: no such config group file {path}; choose one of {choices}.")
            files.append(path)
        else:
            rest.append(arg)
    return files, rest


def _parse_overrides(argv: Sequence[str], schema: DictConfig) -> DictConfig:
    """Turn ``key=value`` strings into a config; repeated list keys accumulate.

    A value for a text field (``str``, ``Optional[str]`` or a list of ``str`` in ``schema``) is taken literally:
    a prompt such as ``a red circle: the big one`` or ``{x}`` stays that text instead of becoming a YAML
    mapping (a list of text still takes a flow list of plain items, ``prompt=[a, b]``, see :func:`_text_list`).
    Every other value is parsed as YAML, and one of the wrong shape for its field (a mapping or list for a
    number, a nested value in a list of numbers) is a :class:`ConfigError` naming the key.
    """
    dotlist: dict[str, Any] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"{arg!r} is not a key=value override; write e.g. prompt=\"a red circle\".")
        if retired := _retired(schema, key):
            raise ConfigError(retired)
        node = _schema_node(schema, key)
        if isinstance(node, ListConfig) and node._metadata.element_type is str:
            parsed: Any = _text_list(value)
        elif isinstance(node, StringNode):
            parsed = _literal(value, optional=node._is_optional())
        else:
            parsed = _parse_value(key, value)
        section = OmegaConf.select(schema, key, default=None, throw_on_missing=False)
        if isinstance(section, DictConfig) and not isinstance(parsed, (dict, DictConfig)):
            raise ConfigError(f"{key}={value}: {key} is a config section, not a value; set one of its keys "
                              f"({', '.join(f'{key}.{k}' for k in list(section.keys())[:4])}, ...).")
        _check_shape(key, value, parsed, node)
        is_list = isinstance(node, ListConfig) or _is_list_field(schema, key)
        if is_list and not isinstance(parsed, (list, ListConfig)):
            dotlist.setdefault(key, []).append(parsed)
        else:
            dotlist[key] = parsed
    cfg = OmegaConf.create()
    for key, value in dotlist.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


# What ``key=null`` means for an optional text field (e.g. ``edit.prompt=null`` clears an edit a config file set);
# any other spelling, and this one for a prompt, is text.
_NULL_TEXT = "null"
# The names of scalar field types in "takes one ..." messages.
_SCALAR_NAMES = {IntegerNode: "integer", FloatNode: "number", BooleanNode: "true or false"}


def _parse_value(key: str, value: str) -> Any:
    """``value`` parsed as YAML, as OmegaConf parses a dotlist value; errors name ``key``."""
    try:
        return OmegaConf.from_dotlist([f"x={value}"]).x if value.strip() else value
    except yaml.YAMLError as err:
        # The value is parsed alone under a dummy key: name the real key, and the parser's first line only.
        raise ConfigError(f"Bad value for config key {key!r}: {value!r} cannot be parsed "
                          f"({str(err).splitlines()[0]}); quote it or fix its brackets.") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"Bad value for config key {key!r}: {value!r} cannot be resolved "
                          f"({str(err).splitlines()[0].rstrip('.')}).") from None


def _literal(value: str, optional: bool) -> str | None:
    """``value`` as the text it is; ``${`` is escaped so OmegaConf never reads it as an interpolation."""
    if optional and value == _NULL_TEXT:
        return None
    return value.replace("${", "\\${")


def _schema_node(schema: DictConfig, key: str) -> Any:
    """The schema's node for a dotted ``key`` (a value node, list or section), or None for an unknown key."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(schema, parent_key, default=None) if parent_key else schema
    if not isinstance(parent, DictConfig):
        return None
    # Not ``leaf in parent``: that is False for a required (``???``) key such as run.name.
    return parent._get_node(leaf, throw_on_missing_key=False)


def _text_list(value: str) -> str | list[str]:
    """A value for a list-of-text field: a flow list of plain items (``[a, b]``) is that list, each item taken
    as written; anything else (``a: b``, ``[x] y``, ``[a, b: c]``, ``- x``) is one item, taken literally."""
    if value.lstrip().startswith("["):
        try:
            # BaseLoader keeps every scalar as the text written ([true, 1e5] is ["true", "1e5"]) and, unlike
            # the full loader, builds no objects.
            items = yaml.load(value, Loader=yaml.BaseLoader)
        except yaml.YAMLError:
            items = None
        if isinstance(items, list) and all(isinstance(item, str) for item in items):
            return [item.replace("${", "\\${") for item in items]
    return _literal(value, optional=False)  # type: ignore[return-value]


def _check_shape(key: str, value: str, parsed: Any, node: Any) -> None:
    """Refuse a mapping or list where ``node`` takes one number or flag, and nesting in a list of them."""
    containers = (dict, list, DictConfig, ListConfig)
    if isinstance(node, ValueNode) and not isinstance(node, StringNode) and isinstance(parsed, containers):
        what = "mapping" if isinstance(parsed, (dict, DictConfig)) else "list"
        kind = _SCALAR_NAMES.get(type(node), "value")
        raise ConfigError(f"{key}={value}: {key} takes one {kind}, not a {what}; write e.g. {key}={node._value()}.")
    if isinstance(node, ListConfig) and node._metadata.element_type is not str:
        items = parsed if isinstance(parsed, (list, ListConfig)) else [parsed]
        if any(isinstance(item, containers) for item in items):
            example = ",".join(str(v) for v in node) if len(node) else "..."
            raise ConfigError(f"{key}={value}: {key} is a list of plain values, not of mappings or lists; "
                              f"write e.g. {key}=[{example}].")


def _is_list_field(schema: DictConfig, key: str) -> bool:
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(schema, parent_key) if parent_key else schema
    if not isinstance(parent, DictConfig):
        return False
    try:
        return OmegaConf.is_list(parent._get_node(leaf)) or "list" in str(parent._get_node(leaf)._metadata.ref_type)
    except (AttributeError, KeyError, OmegaConfBaseException):
        return False


def _explain(err: OmegaConfBaseException, schema: DictConfig) -> str:
    """One sentence for a failed merge: the unknown key with the closest valid ones, or the bad value."""
    key = getattr(err, "full_key", None) or ""
    if retired := _retired(schema, key):
        return retired
    msg = str(err).splitlines()[0]
    if "not in struct" in msg or ("Key '" in msg and "not" in msg):
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(schema, parent_key) if parent_key else schema
        options = list(parent.keys()) if isinstance(parent, DictConfig) else []
        close = difflib.get_close_matches(leaf, options, n=1)
        hint = f" Did you mean {(parent_key + '.' if parent_key else '') + close[0]!r}?" if close else ""
        return f"Unknown config key {key!r}.{hint} Valid keys here: {', '.join(options)}."
    return f"Bad value for config key {key!r}: {msg}."


def _retired(schema: DictConfig, key: str) -> str | None:
    """The error for a retired ``key`` of a section ``schema`` has (``run.tensorboard`` in a train config), else
    None (an unknown key like any other)."""
    section = key.rpartition(".")[0]
    if key not in RETIRED_KEYS or not isinstance(OmegaConf.select(schema, section, default=None), DictConfig):
        return None
    return f"Config key {key!r} was retired; {RETIRED_KEYS[key]}."


def load_config(
    schema_cls: type[C], argv: Sequence[str], config_dir: str | os.PathLike | None = None, task: str | None = None,
    inputs: bool = True, check: bool = True,
) -> C:
    """Build a config from ``schema_cls`` defaults, ``configs/<task>.yaml``, group files and overrides.

    Args:
        schema_cls: the dataclass that defines keys, types and defaults.
        argv: command-line ``key=value`` strings (and ``group=name`` selections).
        config_dir: folder with ``<task>.yaml`` and group sub-folders; None uses defaults and overrides only.
        task: the base YAML's stem, e.g. ``"predict"``.
        inputs: require the command's inputs: every required (``???``) value, such as a dataset run's
            ``run.name``, and a predict config's image and prompts (see :func:`validate`).
        check: validate the merged values (ranges, writable folders, installed loggers); ``--help`` shows a
            config without, so that it never fails on the machine it runs on.

    Returns:
        The validated config object (an OmegaConf structured config typed as ``schema_cls``).

    Raises:
        ConfigError: unknown key, wrong type, missing required value or out-of-range value.
    """
    schema = OmegaConf.structured(schema_cls)
    sources: list[Path] = []
    if config_dir is not None:
        config_dir = Path(config_dir)
        groups, argv = _group_files(config_dir, argv)
        if task is not None and (config_dir / f"{task}.yaml").is_file():
            sources.append(config_dir / f"{task}.yaml")
        sources += groups
    try:
        cfg = schema
        for path in sources:
            cfg = OmegaConf.merge(cfg, _load_yaml(path, config_dir, groups, schema))
        cfg = OmegaConf.merge(cfg, _parse_overrides(argv, schema))
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err, schema)) from None
    if missing and inputs:
        raise ConfigError(f"Missing required config value(s): {', '.join(missing)}; pass them as key=value.")
    if check:
        validate(cfg, inputs)
    return cfg  # type: ignore[return-value]


def apply_overrides(cfg: C, overrides: Mapping[str, Any], inputs: bool = True) -> C:
    """``cfg`` with ``overrides`` merged in and validated, for callers in Python (the command line's
    ``key=value`` strings go through :func:`load_config`).

    Args:
        cfg: a config built by :func:`load_config` (or ``OmegaConf.structured``).
        overrides: nested (``{"trainer": {"max_steps": 50}}``) and/or dotted (``{"trainer.max_steps": 50}``)
            keys with Python values, taken as they are (no YAML parsing).

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or a value out of range.
    """
    schema = cfg if OmegaConf.is_config(cfg) else OmegaConf.structured(cfg)
    try:
        update = OmegaConf.create()
        for key, value in overrides.items():
            OmegaConf.update(update, key, value, merge=True, force_add=True)
        merged = OmegaConf.merge(schema, update)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err, schema)) from None
    validate(merged, inputs)
    return merged  # type: ignore[return-value]


def drop_retired_keys(saved: DictConfig) -> DictConfig:
    """``saved`` (a config read back from a run folder's ``config.yaml``) without the :data:`RETIRED_KEYS` it
    may hold from before they were retired, so that it merges into today's schema. Changes ``saved`` in place."""
    for key in RETIRED_KEYS:
        section, _, leaf = key.rpartition(".")
        node = OmegaConf.select(saved, section, default=None) if section else saved
        if isinstance(node, DictConfig) and leaf in node:
            node.pop(leaf)
    return saved


def _load_yaml(path: Path, config_dir: Path, selected: list[Path], schema: DictConfig) -> DictConfig:
    """Load one YAML file; a task file's ``defaults: {group: name}`` pulls in group files the command line
    did not select itself."""
    data = OmegaConf.load(path)
    if path.parent.parent == config_dir and path.parent.name in GROUPS:  # a group file
        return _for_task(data, schema)
    defaults = data.pop("defaults", None) if isinstance(data, DictConfig) else None
    if not defaults:
        return data
    chosen = {p.parent.name for p in selected}
    merged = OmegaConf.create()
    for group, name in defaults.items():
        if group not in chosen:
            group_file = config_dir / group / f"{name}.yaml"
            if not group_file.is_file():
                raise ConfigError(f"{path}: defaults name {group}={name}, but {group_file} does not exist.")
            merged = OmegaConf.merge(merged, _for_task(OmegaConf.load(group_file), schema))
    return OmegaConf.merge(merged, data)


def _for_task(group: DictConfig, schema: DictConfig) -> DictConfig:
    """A group file's settings for the task being configured.

    A model preset holds what suits its model for every task, e.g. ``data.pairs_per_step`` for dataset runs;
    a task leaves out the sections only other tasks have (``predict.py`` has no ``data``). Any other unknown
    key still fails the merge.
    """
    other_tasks = {f.name for task in (TrainConfig, PredictConfig) for f in fields(task)}
    for key in [k for k in group if k in other_tasks and k not in schema]:
        group.pop(key)
    return group



def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (saved beside every run's outputs, and handed to worker processes).

    Text that holds a literal ``${`` (a prompt, a path) is escaped again, so reading the file back gives the
    same text rather than an interpolation to resolve.
    """
    return OmegaConf.to_yaml(OmegaConf.create(_escape_interpolations(OmegaConf.to_container(cfg, resolve=True))))


def _escape_interpolations(node: Any) -> Any:
    """``node`` (plain containers) with every ``${`` in its strings escaped as ``\\${``."""
    if isinstance(node, dict):
        return {k: _escape_interpolations(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_escape_interpolations(v) for v in node]
    return node.replace("${", "\\${") if isinstance(node, str) else node
