"""Command-line overrides checked against the typed schema and the config groups before Hydra composes.

The schema dataclasses (neco.config) are merged in struct mode, so a misspelt key in a YAML file or in a plain
``key=value`` override fails. Hydra's ``+key=value`` and ``++key=value`` however add a key even to a struct node
(by design: they lift struct mode for that one update), and Hydra's message for a plain misspelt key suggests
exactly that ``+``. ``+optim.lr_backbon=1e-4`` would then train at the default learning rate and store the typo
in config.yaml. So every override key is looked up in the schema first, with or without ``+``, and a group
option (``backbone=...``, ``experiment=...``) among the files of its group; a miss is one line with the closest
names. Nodes the schema leaves open on purpose (typed ``Any`` or ``dict``, such as the per-protocol options under
``eval`` of ``python -m neco.eval``, which each protocol checks itself) accept any key below them.

A choice option (typed with an enum of neco.choices) is checked for its value too. Hydra would reject a wrong
value while composing, but inside ``hydra.main`` that error is printed by Hydra itself over several lines (exit
1) before any code of ours runs; checked here it is one line naming the key and the valid values, exit 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException

from neco.errors import ConfigError
from neco.project import conf_dir

CONF_DIR = conf_dir()


def _field_types(schema: type) -> dict[str, Any]:
    hints = typing.get_type_hints(schema)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(schema)}


def _unwrap_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp


def schema_keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key the dataclass ``schema`` defines (nested dataclasses expanded)."""
    keys = []
    for name, tp in _field_types(schema).items():
        tp = _unwrap_optional(tp)
        keys.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            keys += schema_keys(tp, f"{prefix}{name}.")
    return keys


def unknown_key_message(schema: type, key: str) -> Optional[str]:
    """Why ``key`` (dotted) is not a setting of ``schema``, naming the closest ones; None if it is (or may be)."""
    node: Any = schema
    parts = key.split(".")
    for depth, part in enumerate(parts):
        node = _unwrap_optional(node)
        if not dataclasses.is_dataclass(node):
            return None  # an open node (Any, dict), a list or a value: Hydra and OmegaConf decide
        fields = _field_types(node)
        if part in fields:
            node = fields[part]
            continue
        parent = ".".join(parts[:depth])
        prefix = f"{parent}." if parent else ""
        everywhere = schema_keys(schema)
        # The same name in another place first (lr_backbone -> optim.lr_backbone), then a near spelling here.
        close = [k for k in everywhere if k.endswith("." + key)][:2]
        close = close or [prefix + m for m in difflib.get_close_matches(part, list(fields), n=2, cutoff=0.75)]
        close = close or difflib.get_close_matches(key, everywhere, n=2, cutoff=0.8)
        if close:
            return f"unknown setting {key} (did you mean {' or '.join(close)}?)"
        where = f"{parent} has" if parent else "the config has"
        return f"unknown setting {key} ({where}: {', '.join(fields)})"
    return None


def field_type(schema: type, key: str) -> Any:
    """The declared type of dotted ``key`` in ``schema`` (Optional unwrapped); None where the schema is open."""
    node: Any = schema
    for part in key.split("."):
        node = _unwrap_optional(node)
        if not dataclasses.is_dataclass(node):
            return None
        node = _field_types(node).get(part)
    return _unwrap_optional(node)


def invalid_choice_message(key: str, value: Any, choices: type[enum.Enum]) -> Optional[str]:
    """Why ``value`` is not one of the enum ``choices`` of ``key`` (one line with the valid names); None if it is."""
    names = list(choices.__members__)
    text = value.name if isinstance(value, choices) else str(value)
    if isinstance(value, str) and text.removeprefix(f"{choices.__name__}.") in names:
        return None
    close = difflib.get_close_matches(text, names, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{key}={text} is not a valid choice{hint}; choose one of: {', '.join(names)}"


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """Options of config group ``group``: its YAML files, those in subfolders as ``sub/name``."""
    folder = conf_dir / group
    return sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))


def unknown_option_message(group: str, option: str, conf_dir: Path = CONF_DIR) -> Optional[str]:
    """Why ``option`` is not an option of ``group``, naming the closest ones and listing the presets."""
    options = group_options(group, conf_dir)
    if option in options:
        return None
    by_name: dict[str, list[str]] = {}
    for o in options:
        by_name.setdefault(o.rsplit("/", 1)[-1], []).append(o)
    close = difflib.get_close_matches(option, options, n=2, cutoff=0.75)
    for name in difflib.get_close_matches(option.rsplit("/", 1)[-1], list(by_name), n=2, cutoff=0.75):
        close += [o for o in by_name[name] if o not in close]
    hint = f" (did you mean {' or '.join(close[:3])}?)" if close else ""
    top = [o for o in options if "/" not in o]
    nested = sorted({o.split("/", 1)[0] for o in options if "/" in o})
    listing = ", ".join(top)
    for sub in nested:
        names = [o.split("/", 1)[1] for o in options if o.startswith(sub + "/")]
        listing += f"; {sub}/: {', '.join(names)}"
    return f"{group}={option}: no such {group} option{hint}; options: {listing}"


def _option_values(override) -> list[str]:
    """The option names an override of a group selects (one, a list, or the choices of a sweep)."""
    if override.is_sweep_override():
        try:
            return [v for v in override.sweep_string_iterator() if isinstance(v, str)]
        except Exception:  # range/interval sweeps and other forms Hydra itself will judge
            return []
    value = override.value()
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, str)]


def _choice_values(override) -> list[Any]:
    """The values an override gives its key: one, or each choice of a sweep (other sweeps are left to Hydra)."""
    if override.is_sweep_override():
        try:
            return list(override.sweep_string_iterator())
        except Exception:  # range/interval sweeps: Hydra judges them
            return []
    return [override.value()]


def check_overrides(overrides: list[str], schema: type, conf_dir: Path = CONF_DIR,
                    check_groups: bool = True, open_type: Optional[Callable[[str], Any]] = None) -> None:
    """Raise :class:`ConfigError` for the first override whose key ``schema`` does not know (also with ``+`` or
    ``++``), whose choice value is not one of its enum, or whose group option has no file in ``conf_dir``.
    ``open_type(key)`` gives the type of a key below a node ``schema`` leaves open (None: unchecked).
    Overrides Hydra cannot parse, of ``hydra`` itself, deletions (``~key``) and package overrides
    (``group@pkg=...``) are left to Hydra."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException:
        return  # Hydra reports the syntax error itself
    for override in parsed:
        key = override.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")) or override.is_delete() or override.package:
            continue
        if key.split(".")[0] == "eval" and "eval" not in _field_types(schema):
            # conf/eval/ holds the protocols of `python -m neco.eval`; a training command has no `eval`.
            raise ConfigError(f"{override.input_line}: training has no eval settings; its checks along the way are "
                              "monitor=none|quick|kmeans|attention (monitor.<option>=...), and the evaluation "
                              "protocols run with python -m neco.eval eval=<protocol>")
        if "." not in key and "/" not in key and (conf_dir / key).is_dir():
            if check_groups:
                for option in _option_values(override):
                    message = unknown_option_message(key, option, conf_dir)
                    if message:
                        raise ConfigError(message)
            continue
        message = unknown_key_message(schema, key)
        if message:
            raise ConfigError(f"{message}, in {override.input_line}")
        choices = field_type(schema, key) or (open_type(key) if open_type else None)
        if isinstance(choices, type) and issubclass(choices, enum.Enum):
            for value in _choice_values(override):
                message = invalid_choice_message(key, value, choices)
                if message:
                    raise ConfigError(message)
