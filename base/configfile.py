"""Typed daemon configuration: dataclass defaults < TOML file < FLEETWATCH_* variables < flags.

Each daemon declares one frozen dataclass whose fields carry their help text and checks in
`setting(...)`. `load_config` builds it from every source and names the key (and where it came
from) in every error, so a typo in /etc/fleetwatch/agent.toml stops the daemon at start with a
message that says which line to fix instead of running with a silent default. Passwords and
tokens are `Secret` fields: every message, log line and --help text shows them redacted, and a
`<key>_file` setting (`setting(file_for=...)`) can read them from a file instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

ENV_PREFIX = "FLEETWATCH_"
# What a secret with no safe part to show prints as.
MASK = "********"

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid; the message names the key."""


class Secret:
    """A string setting that must never be printed: str() and repr() give only its redacted form.

    The value is not a str on purpose, so that it cannot slip into a log line or an f-string
    unnoticed; `reveal()` hands it out where it is used (the database engine, the HTTP request).
    Subclasses choose what may be shown by overriding `redact`.
    """

    __slots__ = ("_redacted", "_value")

    def __init__(self, value: str) -> None:
        self._value = value
        # Computed once, so that a redactor is never run again where an exception would hide the log line.
        self._redacted = self.redact(value)

    @staticmethod
    def redact(value: str) -> str:
        """The form of `value` fit for logs, error messages and API answers."""
        return MASK

    def reveal(self) -> str:
        return self._value

    def __str__(self) -> str:
        return self._redacted

    def __repr__(self) -> str:
        return repr(self._redacted)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def url_origin(url: str) -> str:
    """`scheme://host[:port]/...`: the URL without its userinfo, path, query and fragment (where tokens live)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return MASK
    if not parts.scheme or not host:
        return MASK
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{'' if port is None else f':{port}'}/..."


def setting(
    default: Any,
    help: str,
    *,
    check: Callable[[Any], str | None] | None = None,
    flag: bool = True,
    file_for: str | None = None,
) -> Any:
    """A config field: `check(value)` returns an error text or None. `flag=False` keeps it file/env only.

    `file_for="key"` makes this field the path of a file that holds `key`'s value, read at load
    (secrets kept out of the TOML file, the environment and the process list). A str key takes the
    file's content without surrounding whitespace; a list key takes one item per line, blank lines
    and # comments ignored. Setting both the key and its file is an error.
    """
    metadata = {"help": help, "check": check, "flag": flag, "file_for": file_for}
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


def _secret_type(tp: Any) -> type[Secret] | None:
    """The Secret subclass a field holds, alone or as list items; None for other fields."""
    base, _ = _base_type(tp)
    if typing.get_origin(base) in (list, tuple):
        base = (typing.get_args(base) or (str,))[0]
    return base if isinstance(base, type) and issubclass(base, Secret) else None


def _wrap(tp: Any, value: Any) -> Any:
    """`value` with the plain strings of a secret field wrapped (defaults, directly built configs)."""
    secret = _secret_type(tp)
    if secret is None:
        return value
    if isinstance(value, str):
        return secret(value)
    if isinstance(value, (list, tuple)):
        return [secret(v) if isinstance(v, str) else v for v in value]
    return value


def wrap_secrets(config: Any) -> None:
    """For a config dataclass's __post_init__: code that builds it with plain strings still gets Secrets."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        wrapped = _wrap(hints[f.name], value)
        if wrapped is not value:
            object.__setattr__(config, f.name, wrapped)


def _shown(value: Any, secret: type[Secret] | None) -> str:
    """`value` as an error message may quote it: a secret's redacted form, or only its type."""
    if secret is None:
        return repr(value)
    return repr(secret.redact(value)) if isinstance(value, str) else f"{type(value).__name__} (value not shown)"


def _coerce(key: str, source: str, value: Any, tp: Any) -> Any:
    base, optional = _base_type(tp)
    where = f"{key} (from {source})"
    secret = _secret_type(tp)
    if value is None or (optional and isinstance(value, str) and value == ""):
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required")
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        (item_type,) = typing.get_args(base)[:1] or (str,)
        if dataclasses.is_dataclass(item_type):
            # A list of tables ([[webhooks]]): errors name the item, webhooks[1].url.
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{where}: expected a list of tables ([[{key}]] in TOML), got {value!r}")
            return [_coerce(f"{key}[{i}]", source, v, item_type) for i, v in enumerate(value)]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_shown(value, secret)}")
        return [_coerce(key, source, v, item_type) for v in value]
    if origin is dict:
        item_type = typing.get_args(base)[1]
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table of names to values, got {value!r}")
        return {str(k): _coerce(f"{key}.{k}", source, v, item_type) for k, v in value.items()}
    if isinstance(base, type) and dataclasses.is_dataclass(base):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return _build(base, value, key, source)
    if secret is not None:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_shown(value, secret)}")
        return secret(value)
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
            raise ConfigError(
                f"{where}: expected {'an integer' if base is int else 'a number'}, got {value!r}"
            ) from None
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return number
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _build(cls: type[T], data: Mapping[str, Any], key: str, source: str) -> T:
    """A nested settings table (a dataclass of `setting` fields) from TOML; errors name key.field."""
    fields = _fields(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{key} (from {source}): unknown key {unknown[0]!r} (known keys: {', '.join(sorted(fields))})"
        )
    values = {name: _coerce(f"{key}.{name}", source, v, fields[name].type) for name, v in data.items()}
    try:
        item = cls(**values)
    except TypeError:  # a field without a default was left out
        missing = [n for n, f in fields.items() if n not in values and _required(f)]
        raise ConfigError(f"{key} (from {source}): {', '.join(missing)} must be set") from None
    except ConfigError as exc:  # the table's own check of settings that go together
        raise ConfigError(f"{key} (from {source}): {exc}") from None
    _check_fields(item, fields, prefix=f"{key}.")
    return item


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _check_fields(config: Any, fields: Mapping[str, dataclasses.Field], prefix: str = "") -> None:
    """Run each field's `check`; the error names the key (with `prefix` for a nested table)."""
    for name, f in fields.items():
        check = f.metadata.get("check")
        value = getattr(config, name)
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                raise ConfigError(f"{prefix}{name}: {problem} (got {value!r})")


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


class ConfigPath(str):
    """A configuration file path given on purpose (--config PATH): load_config refuses it missing.

    The default path stays a plain str: a host without /etc/fleetwatch/*.toml runs on defaults,
    but a mistyped --config must not start the daemon on defaults without a word.
    """


class _ExplicitConfigPath(argparse.Action):
    """Stores --config's value as a ConfigPath (the default, never passed through here, stays a str)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | typing.Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, ConfigPath(str(values)))


def daemon_parser(prog: str, description: str, cls: type, default_path: str) -> argparse.ArgumentParser:
    """A daemon's command line: --config plus one flag per setting of `cls`."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description + " Settings come from the TOML file, then FLEETWATCH_<KEY> variables, then flags.",
    )
    parser.add_argument(
        "--config",
        default=default_path,
        action=_ExplicitConfigPath,
        help=f"TOML configuration file; one named here must exist [default: {default_path}, which may be missing]",
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
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            assert f.default_factory is not dataclasses.MISSING, f"{name} has no default"
            default = f.default_factory()
        default = _wrap(f.type, default)
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
    """Build `cls` from defaults, the TOML file at `path`, FLEETWATCH_* variables and flags.

    A missing file at `path` is fine (defaults), unless `require_file` is set or `path` is a
    ConfigPath (named by --config): then it is an error.
    """
    fields = _fields(cls)
    values: dict[str, Any] = {}
    # Where each key was set, for the errors that name two keys.
    given: dict[str, str] = {}

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
                given[key] = str(file)
        elif isinstance(path, ConfigPath):
            raise ConfigError(f"--config {file}: no such file")
        elif require_file:
            raise ConfigError(f"{file}: configuration file not found")

    # Unknown FLEETWATCH_* variables are ignored: agent and collector share the prefix on one host.
    for key, raw in (os.environ if env is None else env).items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name in fields:
                values[name] = _coerce(name, f"environment {key}", raw, fields[name].type)
                given[name] = f"environment {key}"

    if isinstance(flags, argparse.Namespace):
        flags = vars(flags)
    for name, raw in (flags or {}).items():
        if name in fields and raw is not None:
            given[name] = "--" + name.replace("_", "-")
            values[name] = _coerce(name, given[name], raw, fields[name].type)

    for name, f in fields.items():
        target = f.metadata.get("file_for")
        if target is not None and values.get(name):
            if target in given:
                raise ConfigError(
                    f"{target} (from {given[target]}) and {name} (from {given[name]}) are both set; set only one"
                )
            values[target] = _read_setting_file(name, given[name], values[name], target, fields[target].type)

    config = cls(**values)
    _check_fields(config, fields)
    return config


def _read_setting_file(name: str, source: str, path: str, target: str, tp: Any) -> Any:
    """`target`'s value from the file at `path`, named by setting `name`; errors name the key and the path."""
    where = f"{name} (from {source})"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: {path} is not UTF-8 text") from None
    base, _ = _base_type(tp)
    value: Any
    if typing.get_origin(base) in (list, tuple):
        value = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    else:
        value = text.strip()
        if not value:
            raise ConfigError(f"{where}: {path} is empty")
    return _coerce(target, f"{path}, named by {name}", value, tp)


def describe(config: Any) -> dict[str, Any]:
    """The effective settings, for the start-up log line; Secret values print redacted."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
