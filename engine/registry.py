"""Name → implementation tables for the engine's pluggable parts.

Every component the spec names (loss, student family, optimizer, step kind) is one class registered under
the spec's name, and its ``Config`` *is* the spec's pydantic model for that name::

    @losses.register("kd")
    class KDLoss:
        Config = jobspec.KDLoss
        def __init__(self, config: jobspec.KDLoss): ...

``losses.build(step.loss)`` takes an already validated config (the job's :class:`jobspec.JobSpec`), picks
the class by the config's discriminator (``type`` / ``family`` / ``kind``) and returns ``cls(config)``.
File formats (teacher, dataset, export) are registered the same way without a config.

No validation happens here: the spec's models did it, once, for the API and the engine alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

import jobspec
import jobspec.base
from engine.errors import InvalidSpec

T = TypeVar("T")

_KEY_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class Registry(Generic[T]):
    """Name → class table for one kind of component.

    ``kind`` labels messages ("loss"); ``key`` is the config field that selects the class ("type");
    ``configs``, for spec components, is the spec's table of config models: a registered class must declare
    exactly that model as its ``Config``.
    """

    def __init__(self, kind: str, key: str, configs: Mapping[str, type[BaseModel]] | None = None):
        self.kind = kind
        self.key = key
        self.configs = configs
        self._items: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator registering the class under ``name`` (snake_case)."""
        if not _KEY_RE.match(name):
            raise ValueError(f"{self.kind} name {name!r} is not snake_case")

        def decorator(cls: type[T]) -> type[T]:
            if name in self._items and self._items[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            if self.configs is not None:
                if name not in self.configs:
                    raise ValueError(f"{self.kind} {name!r} is not in the job spec ({', '.join(self.configs)})")
                if getattr(cls, "Config", None) is not self.configs[name]:
                    raise TypeError(f"{cls.__name__}.Config must be the spec's {self.configs[name].__name__}")
            cls.name = name  # type: ignore[attr-defined]
            self._items[name] = cls
            return cls

        return decorator

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``; unknown → :class:`InvalidSpec`."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise InvalidSpec(f"unknown {self.kind} {name!r}; available: {', '.join(self.names()) or '(none)'}") \
                from None

    def build(self, config: BaseModel | Mapping[str, Any], *, where: str | None = None) -> T:
        """``cls(config)`` for the class ``config`` selects by its ``key`` field.

        ``config`` is normally already validated (a part of the job's :class:`jobspec.JobSpec`); a plain
        mapping (scripts, tests) is validated by the same spec model first, errors naming ``where``.
        """
        if isinstance(config, Mapping):
            if self.configs is None:
                raise TypeError(f"{self.kind} takes no config")
            name = config.get(self.key)
            if name not in self.configs:
                raise InvalidSpec(f"{where or self.kind}.{self.key}: unknown {self.kind} {name!r}; available: "
                                  f"{', '.join(self.names())}")
            try:
                config = self.configs[name].model_validate(dict(config))
            except ValidationError as exc:
                raise InvalidSpec(f"{where or self.kind}: {jobspec.base.validation_message(exc)}") from None
        return self.get(getattr(config, self.key))(config)  # type: ignore[call-arg]


# The engine's registries. Components register themselves when their module is imported;
# ``engine.registries`` imports them all before handing this out.
losses: Registry[Any] = Registry("loss", key="type", configs=jobspec.LOSSES)
students: Registry[Any] = Registry("student family", key="family", configs=jobspec.STUDENT_FAMILIES)
optimizers: Registry[Any] = Registry("optimizer", key="type",
                                     configs={name: jobspec.OptimizerConfig for name in jobspec.OPTIMIZERS})
steps: Registry[Any] = Registry("step kind", key="kind", configs=jobspec.STEP_KINDS)
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

