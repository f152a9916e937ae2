"""Typed daemon configuration: dataclass defaults < TOML file < FLEETWATCH_* variables < flags.

Each daemon declares one frozen dataclass whose fields carry their help text and checks in
`setting(...)`. `load_config` builds it from every source and names the key (and where it came
from) in every error, so a typo in /etc/fleetwatch/agent.toml stops the daemon at start with a
message that says which line to fix instead of running with a silent default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

ENV_PREFIX = "FLEETWATCH_"

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid; the message names the key."""


def setting(
    default: Any,
    help: str,
    *,
    check: Callable[[Any], str | None] | None = None,
    flag: bool = True,
) -> Any:
    """A config field: `check(value)` returns an error text or None. `flag=False` keeps it file/env only."""
    metadata = {"help": help, "check": check, "flag": flag}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be 0 or greater"


def port_number(value: Any) -> str | None:
    return None if 0 <= value <= 65535 else "must be a TCP port number (0-65535; 0 disables or picks a free port)"


def one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _base_type(tp: Any) -> tuple[Any, bool]:
    """The concrete type of a field annotation and whether None is allowed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _coerce(key: str, source: str, value: Any, tp: Any) -> Any:
    base, optional = _base_type(tp)
    where = f"{key} (from {source})"
    if value is None or (optional and isinstance(value, str) and value == ""):
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required")
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        (item_type,) = typing.get_args(base)[:1] or (str,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(key, source, v, item_type) for v in value]
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if base in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = base(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {'an integer' if base is int else 'a number'}, got {value!r}") from None
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return number
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def daemon_parser(prog: str, description: str, cls: type, default_path: str) -> argparse.ArgumentParser:
    """A daemon's command line: --config plus one flag per setting of `cls`."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description + " Settings come from the TOML file, then FLEETWATCH_<KEY> variables, then flags.",
    )
    parser.add_argument(
        "--config", default=default_path, help=f"TOML configuration file [default: {default_path}; missing is fine]"
    )
    add_flags(parser, cls)
    return parser


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --long-flag per field; defaults are None so that only flags given override."""
    group = parser.add_argument_group("settings (also TOML keys and FLEETWATCH_* variables)")
    for name, f in _fields(cls).items():
        if not f.metadata.get("flag", True):
            continue
        base, _ = _base_type(f.type)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        env = ENV_PREFIX + name.upper()
        help_text = f"{f.metadata['help']} [default: {default!r}; env {env}]"
        option = "--" + name.replace("_", "-")
        if base is bool:
            group.add_argument(option, dest=name, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(option, dest=name, default=None, metavar=name.upper(), help=help_text)


def load_config(
    cls: type[T],
    *,
    path: str | os.PathLike | None,
    flags: Mapping[str, Any] | argparse.Namespace | None = None,
    env: Mapping[str, str] | None = None,
    require_file: bool = False,
) -> T:
    """Build `cls` from defaults, the TOML file at `path`, FLEETWATCH_* variables and flags."""
    fields = _fields(cls)
    values: dict[str, Any] = {}

    if path is not None:
        file = Path(path)
        if file.exists():
            try:
                data = tomllib.loads(file.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"{file}: cannot read configuration: {exc}") from None
            for key, value in data.items():
                if key not in fields:
                    known = ", ".join(sorted(fields))
                    raise ConfigError(f"{file}: unknown key {key!r} (known keys: {known})")
                values[key] = _coerce(key, str(file), value, fields[key].type)
        elif require_file:
            raise ConfigError(f"{file}: configuration file not found")

    # Unknown FLEETWATCH_* variables are ignored: agent and collector share the prefix on one host.
    for key, raw in (os.environ if env is None else env).items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name in fields:
                values[name] = _coerce(name, f"environment {key}", raw, fields[name].type)

    if isinstance(flags, argparse.Namespace):
        flags = vars(flags)
    for name, raw in (flags or {}).items():
        if name in fields and raw is not None:
            values[name] = _coerce(name, "--" + name.replace("_", "-"), raw, fields[name].type)

    config = cls(**values)
    for name, f in fields.items():
        check = f.metadata.get("check")
        value = getattr(config, name)
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                raise ConfigError(f"{name}: {problem} (got {value!r})")
    return config


def describe(config: Any) -> dict[str, Any]:
    """The effective settings, for the start-up log line."""
    return dataclasses.asdict(config)
