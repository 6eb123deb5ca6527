"""A small generic plugin registry with typed, strict configs.

Every pluggable piece (loss, student family, optimizer, step kind, teacher
format, dataset format, export format) is one class registered under a
snake_case key::

    @losses.register("kd")
    class KDLoss:
        @dataclass(frozen=True)
        class Config:
            temperature: float = 4.0
            def __post_init__(self):
                check(self.temperature > 0, "temperature must be > 0")
        def __init__(self, config: Config): ...

``registry.build({"type": "kd", "temperature": 2})`` picks the class by the
registry's discriminator key (``type``/``family``/``kind``/``format``), turns the
remaining keys into the class's ``Config`` dataclass (coercing JSON numbers,
rejecting unknown or missing keys) and returns ``cls(config)``. Every problem is
an ``EngineError("invalid_spec", ...)`` whose message names the offending path.

Stdlib only: this module must not import torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Generic, Literal, TypeVar, get_args, get_origin, get_type_hints

from engine.errors import EngineError

T = TypeVar("T")

_KEY_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def check(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``; for ``Config.__post_init__``.

    :func:`make_config` turns it into ``EngineError("invalid_spec")`` prefixed
    with the config's path in the spec.
    """
    if not condition:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class EmptyConfig:
    """Config for plugins that take no options."""


class Registry(Generic[T]):
    """Name -> class table for one kind of plugin.

    ``kind`` is a human label used in messages ("loss"); ``key`` is the spec
    field that selects the plugin ("type").
    """

    def __init__(self, kind: str, key: str):
        self.kind = kind
        self.key = key
        self._items: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator registering the class under ``name`` (snake_case)."""
        if not _KEY_RE.match(name):
            raise ValueError(f"{self.kind} name {name!r} is not snake_case")

        def decorator(cls: type[T]) -> type[T]:
            if name in self._items and self._items[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            cls.Config = getattr(cls, "Config", None)  # type: ignore[attr-defined]
            cls.name = name  # type: ignore[attr-defined]
            self._items[name] = cls
            return cls

        return decorator

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``; unknown -> EngineError("invalid_spec")."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise EngineError(
                "invalid_spec",
                f"unknown {self.kind} {name!r}; available: {', '.join(self.names()) or '(none)'}",
            ) from None

    def build(self, config: Mapping[str, Any], *, where: str | None = None) -> T:
        """Instantiate the plugin a config dict selects: ``cls(cls.Config(**rest))``.

        ``where`` is the config's path in the spec (e.g. ``"steps[0].loss"``),
        used to make error messages precise.
        """
        where = where or self.kind
        if not isinstance(config, Mapping):
            raise EngineError("invalid_spec", f"{where}: expected an object, got {_type_name(config)}")
        if self.key not in config:
            raise EngineError(
                "invalid_spec",
                f"{where}: missing key {self.key!r} (one of: {', '.join(self.names())})",
            )
        name = config[self.key]
        if not isinstance(name, str) or name not in self._items:
            raise EngineError(
                "invalid_spec",
                f"{where}.{self.key}: unknown {self.kind} {name!r}; available: {', '.join(self.names())}",
            )
        cls = self._items[name]
        rest = {k: v for k, v in config.items() if k != self.key}
        cfg = make_config(cls.Config, rest, where=where, label=f"{self.kind} {name!r}")  # type: ignore[attr-defined]
        # Plugins with nested sub-configs (a step's loss/optimizer) define
        # ``from_config(config, where)`` so their errors can name the full path.
        from_config = getattr(cls, "from_config", None)
        if from_config is not None:
            return from_config(cfg, where)
        return cls(cfg)  # type: ignore[call-arg]

    def config_type(self, name: str) -> type:
        return self.get(name).Config  # type: ignore[attr-defined]


def make_config(config_type: type, values: Mapping[str, Any], *, where: str, label: str = "") -> Any:
    """Build the dataclass ``config_type`` from a JSON-like mapping, strictly.

    Unknown keys, missing required keys, wrong types and ``__post_init__``
    checks all become ``EngineError("invalid_spec", "<where>...: <reason>")``.
    """
    fields = {f.name: f for f in dataclasses.fields(config_type) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        what = f" for {label}" if label else ""
        raise EngineError(
            "invalid_spec",
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(k) for k in unknown)}{what} (allowed: {', '.join(sorted(fields)) or 'none'})",
        )
    hints = get_type_hints(config_type)
    kwargs = {}
    for name, f in fields.items():
        if name in values:
            kwargs[name] = _coerce(values[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise EngineError("invalid_spec", f"{where}: missing required key {name!r}")
    try:
        return config_type(**kwargs)
    except ValueError as exc:
        raise EngineError("invalid_spec", f"{where}: {exc}") from None


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check/convert one JSON value against a type annotation.

    Supports int, float, bool, str, Any, dict, Literal, list[X], tuple[X, ...]
    and ``X | None``. JSON has one number type, so integral floats are accepted
    for ints and ints for floats; booleans never pass as numbers.
    """
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        args = get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except EngineError as exc:
                errors.append(exc.message)
        raise EngineError("invalid_spec", errors[0] if len(errors) == 1 else f"{where}: invalid value {value!r}")
    if origin is Literal:
        allowed = get_args(annotation)
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            raise EngineError(
                "invalid_spec", f"{where}: must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise EngineError("invalid_spec", f"{where}: expected an array, got {_type_name(value)}")
        args = get_args(annotation)
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if annotation is bool:
        if not isinstance(value, bool):
            raise EngineError("invalid_spec", f"{where}: expected a boolean, got {_type_name(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EngineError("invalid_spec", f"{where}: expected an integer, got {_type_name(value)}")
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise EngineError("invalid_spec", f"{where}: expected an integer, got {value!r}")
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EngineError("invalid_spec", f"{where}: expected a number, got {_type_name(value)}")
        if not math.isfinite(value):
            raise EngineError("invalid_spec", f"{where}: must be finite, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise EngineError("invalid_spec", f"{where}: expected a string, got {_type_name(value)}")
        return value
    if annotation is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise EngineError("invalid_spec", f"{where}: expected an object, got {_type_name(value)}")
        return dict(value)
    raise TypeError(f"unsupported config annotation {annotation!r} at {where}")


# The engine's registries. Plugins register themselves when their module is
# imported; ``engine.registries`` imports them all before handing this out.
losses: Registry[Any] = Registry("loss", key="type")
students: Registry[Any] = Registry("student family", key="family")
optimizers: Registry[Any] = Registry("optimizer", key="type")
steps: Registry[Any] = Registry("step kind", key="kind")
teacher_formats: Registry[Any] = Registry("teacher format", key="format")
dataset_formats: Registry[Any] = Registry("dataset format", key="format")
exports: Registry[Any] = Registry("export format", key="format")

registries: dict[str, Registry[Any]] = {
    "losses": losses,
    "students": students,
    "optimizers": optimizers,
    "steps": steps,
    "teacher_formats": teacher_formats,
    "dataset_formats": dataset_formats,
    "exports": exports,
}
