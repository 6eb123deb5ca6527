"""Target-driven student search (``search``): which students and KD hyper-parameters a job tries, and the target
its winner must meet.

``"search": {"objective": "smallest", "metric": "accuracy", "max_drop": 0.01, "trials": 20,
"space": {"mlp": {"hidden_layers": [1, 2], "width": [8, 256]}, "lr": [0.001, 0.03]}}`` runs up to ``trials``
distillations (each a child job, a *trial*) with students and hyper-parameters drawn from ``space`` by a TPE
sampler (Bergstra et al., "Algorithms for Hyper-Parameter Optimization", NeurIPS 2011, as implemented by Optuna,
Akiba et al., KDD 2019), stops trials that trail the median of earlier ones at the same epoch (Optuna's
``MedianPruner``), and returns the winner:

* ``smallest``: the fewest parameters among the trials within ``max_drop`` of the teacher's ``metric``;
* ``fastest``: the lowest CPU latency (batch 1) among them;
* ``best``: the highest ``metric`` among the trials within ``max_parameters`` / ``max_latency_ms``.

This module is pure data (pydantic and the standard library): the ranges, the names of the sampled parameters
(:meth:`SearchSpace.dimensions`) and how one sample becomes a trial's spec (:func:`trial_spec`). The API checks
it before 202 (``app/jobs/search.py``); the leader's coordinator samples and runs it (``worker/search.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from jobspec.base import Config

OBJECTIVES = ("smallest", "fastest", "best")
#: Metrics a search can target (every one higher-is-better; the teacher's own value is the reference).
SEARCH_METRICS = ("accuracy", "agreement", "f1_macro", "r2", "cosine")
#: ``max_drop`` when ``smallest`` / ``fastest`` leave it out.
DEFAULT_MAX_DROP = 0.01
TRANSFORMER_HEADS = (1, 2, 4, 8)


def _ordered(pair: tuple[Any, Any]) -> tuple[Any, Any]:
    if pair[0] > pair[1]:
        raise ValueError(f"a range is [low, high] with low <= high, got {list(pair)}")
    return pair


def _range(kind: type, **bounds: Any) -> Any:
    """``[low, high]`` of ``kind`` values within ``bounds`` (pydantic ``Field`` constraints), low <= high."""
    item = Annotated[kind, Field(**bounds)]  # type: ignore[valid-type]
    return Annotated[tuple[item, item], AfterValidator(_ordered)]  # type: ignore[valid-type]


Widths = _range(int, ge=1, le=65536)


class MLPSpace(Config):
    """``mlp`` students: ``hidden_layers`` hidden layers of ``width`` units each (width drawn on a log scale)."""

    hidden_layers: _range(int, ge=1, le=16) = (1, 2)
    width: Widths = (8, 256)


class CNNSpace(Config):
    """``cnn`` students: ``blocks`` conv blocks, the first with ``channels`` channels, doubling per block."""

    blocks: _range(int, ge=1, le=8) = (1, 3)
    channels: _range(int, ge=1, le=1024) = (4, 64)


class ResNetSpace(Config):
    """``resnet`` students: ``depth`` residual blocks of base ``width`` channels."""

    depth: _range(int, ge=1, le=64) = (2, 8)
    width: _range(int, ge=1, le=1024) = (4, 32)


class EmbeddingBagSpace(Config):
    """``embedding_bag`` students (token ids): ``embedding_dim``, then ``hidden_layers`` layers of ``width``."""

    embedding_dim: _range(int, ge=1, le=8192) = (16, 128)
    hidden_layers: _range(int, ge=0, le=8) = (0, 1)
    width: Widths = (16, 128)


class TextTransformerSpace(Config):
    """``text_transformer`` students: ``layers``, ``d_model`` (a multiple of 8, so every head count divides it),
    ``heads`` among 1, 2, 4, 8 within the range, and a feed-forward width of ``ff_mult`` × d_model."""

    layers: _range(int, ge=1, le=48) = (1, 2)
    d_model: _range(int, ge=8, le=4096, multiple_of=8) = (32, 128)
    heads: _range(int, ge=1, le=8) = (1, 4)
    ff_mult: _range(int, ge=1, le=8) = (1, 4)

    @model_validator(mode="after")
    def _some_heads(self) -> TextTransformerSpace:
        if not [h for h in TRANSFORMER_HEADS if self.heads[0] <= h <= self.heads[1]]:
            raise ValueError(f"heads: the range must hold one of {list(TRANSFORMER_HEADS)}")
        return self


class DeriveSpace(Config):
    """The teacher's own architecture shrunk (``student: {"derive"}``): width and depth ratios in (0, 1]."""

    width: _range(float, gt=0, le=1) = (0.25, 1.0)
    depth: _range(float, gt=0, le=1) = (0.5, 1.0)


#: The families a space may hold, in sampling order.
SPACE_FAMILIES: dict[str, type[Config]] = {"mlp": MLPSpace, "cnn": CNNSpace, "resnet": ResNetSpace,
                                           "embedding_bag": EmbeddingBagSpace,
                                           "text_transformer": TextTransformerSpace, "derive": DeriveSpace}


@dataclass(frozen=True)
class Dimension:
    """One sampled parameter: ``name`` (``family`` or ``<family>.<arg>`` or a hyper-parameter), its kind
    (``int`` / ``float`` / ``choice``), its bounds or ``choices``, and whether it is drawn on a log scale."""

    name: str
    kind: Literal["int", "float", "choice"]
    low: float = 0
    high: float = 0
    log: bool = False
    step: int | None = None
    choices: tuple[Any, ...] = ()


class SearchSpace(Config):
    """Student families with their ranges (``[low, high]``, inclusive), and optionally KD hyper-parameters:
    ``temperature`` and ``alpha`` (every distill step whose loss is ``kd``; temperature also ``soft_ce``) and
    ``lr`` (every distill step's optimizer, drawn on a log scale). A family left out is not tried."""

    mlp: MLPSpace | None = None
    cnn: CNNSpace | None = None
    resnet: ResNetSpace | None = None
    embedding_bag: EmbeddingBagSpace | None = None
    text_transformer: TextTransformerSpace | None = None
    derive: DeriveSpace | None = None
    temperature: _range(float, gt=0, le=100) | None = None
    alpha: _range(float, ge=0, le=1) | None = None
    lr: _range(float, gt=0, le=10) | None = None

    @model_validator(mode="after")
    def _one_family(self) -> SearchSpace:
        if not self.families():
            raise ValueError(f"name at least one student family to search: {', '.join(SPACE_FAMILIES)}")
        return self

    def families(self) -> list[str]:
        return [name for name in SPACE_FAMILIES if getattr(self, name) is not None]

    def dimensions(self) -> list[Dimension]:
        """Every parameter a trial samples, ``family`` first; a family's own ones are sampled only for it."""
        dims = [Dimension("family", "choice", choices=tuple(self.families()))]
        for family in self.families():
            dims += _family_dimensions(family, getattr(self, family))
        if self.temperature is not None:
            dims.append(Dimension("temperature", "float", *self.temperature))
        if self.alpha is not None:
            dims.append(Dimension("alpha", "float", *self.alpha))
        if self.lr is not None:
            dims.append(Dimension("lr", "float", *self.lr, log=True))
        return dims

    def corners(self) -> list[dict[str, Any]]:
        """For each family, the sample with every range at its high end (the largest, slowest trial)."""
        out = []
        for family in self.families():
            sample: dict[str, Any] = {"family": family}
            for d in _family_dimensions(family, getattr(self, family)):
                sample[d.name] = max(d.choices) if d.kind == "choice" else d.high
            out.append(sample)
        return out


def _family_dimensions(family: str, r: Any) -> list[Dimension]:
    def ints(arg: str, pair: tuple[int, int], log: bool = False, step: int | None = None) -> Dimension:
        return Dimension(f"{family}.{arg}", "int", pair[0], pair[1], log=log and pair[0] >= 1, step=step)

    if family == "mlp":
        return [ints("hidden_layers", r.hidden_layers), ints("width", r.width, log=True)]
    if family == "cnn":
        return [ints("blocks", r.blocks), ints("channels", r.channels, log=True)]
    if family == "resnet":
        return [ints("depth", r.depth), ints("width", r.width, log=True)]
    if family == "embedding_bag":
        return [ints("embedding_dim", r.embedding_dim, log=True), ints("hidden_layers", r.hidden_layers),
                ints("width", r.width, log=True)]
    if family == "text_transformer":
        heads = tuple(h for h in TRANSFORMER_HEADS if r.heads[0] <= h <= r.heads[1])
        return [ints("layers", r.layers), ints("d_model", r.d_model, step=8),
                Dimension(f"{family}.heads", "choice", choices=heads), ints("ff_mult", r.ff_mult)]
    return [Dimension("derive.width", "float", *r.width), Dimension("derive.depth", "float", *r.depth)]


class Pruning(Config):
    """Stop a running trial whose held-out ``metric`` after an epoch is below the median of the finished trials'
    at the same epoch (Optuna's ``MedianPruner``), once ``startup_trials`` trials have finished and the trial is
    past ``warmup_epochs``."""

    enabled: bool = True
    startup_trials: int = Field(4, ge=0, le=200, description="Finished trials needed before any is pruned.")
    warmup_epochs: int = Field(2, ge=0, le=10_000, description="Epochs every trial runs before it may be pruned.")


class SearchConfig(Config):
    """Search students and KD hyper-parameters for the one that meets a target (see the module doc)."""

    objective: Literal["smallest", "fastest", "best"] = "smallest"
    metric: Literal["accuracy", "agreement", "f1_macro", "r2", "cosine"] | None = Field(
        None, description="Held-out metric compared with the teacher's. Default: accuracy (labelled "
                          "classification data), agreement (unlabelled), r2 (regression), cosine (embedding).")
    max_drop: float | None = Field(None, ge=0, le=100, description="Most the winner may lose against the "
                                   "teacher's metric (absolute; 0.01 = one point). Default 0.01 for smallest / "
                                   "fastest; with best, a constraint only when given.")
    trials: int = Field(20, ge=1, le=200, description="Trials (child jobs) to run at most.")
    parallel: int | None = Field(None, ge=1, le=200, description="Most trials in flight at once. Default: as "
                                 "many as the workers take (one more waits in the queue).")
    max_parameters: int | None = Field(None, ge=1, description="best: the winner's parameter budget.")
    max_latency_ms: float | None = Field(None, gt=0, description="best: the winner's CPU latency budget "
                                                                  "(batch 1, median, milliseconds).")
    space: SearchSpace | None = Field(None, description="Families and ranges. Default: by the data's inputs "
                                                        "(mlp for feature rows, cnn + mlp for images, "
                                                        "embedding_bag for token ids) and lr.")
    pruning: Pruning = Field(default_factory=Pruning)

    @model_validator(mode="after")
    def _target(self) -> SearchConfig:
        if self.objective == "best" and self.max_parameters is None and self.max_latency_ms is None:
            raise ValueError("objective 'best' needs a budget: max_parameters and/or max_latency_ms")
        return self

    def drop_limit(self) -> float | None:
        """The largest drop a winner may have (None: no constraint on the metric)."""
        if self.max_drop is not None:
            return self.max_drop
        return None if self.objective == "best" else DEFAULT_MAX_DROP


def student_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """The ``student`` of a trial from its sampled ``params`` (``family`` + ``<family>.<arg>`` values)."""
    family = params["family"]

    def p(arg: str) -> Any:
        return params[f"{family}.{arg}"]

    if family == "mlp":
        return {"family": "mlp", "hidden": [int(p("width"))] * int(p("hidden_layers"))}
    if family == "cnn":
        return {"family": "cnn", "channels": [int(p("channels")) * 2**i for i in range(int(p("blocks")))]}
    if family == "resnet":
        return {"family": "resnet", "depth": int(p("depth")), "width": int(p("width"))}
    if family == "embedding_bag":
        return {"family": "embedding_bag", "embedding_dim": int(p("embedding_dim")),
                "hidden": [int(p("width"))] * int(p("hidden_layers"))}
    if family == "text_transformer":
        d_model = int(p("d_model"))
        return {"family": "text_transformer", "layers": int(p("layers")), "d_model": d_model,
                "heads": int(p("heads")), "ff": d_model * int(p("ff_mult"))}
    return {"derive": {"width": float(p("width")), "depth": float(p("depth"))}}


def describe_student(student: Mapping[str, Any]) -> str:
    """``mlp [64, 64]``, ``cnn [8, 16]``, ``derive width 0.5 depth 1``: a trial's student in a message."""
    if "derive" in student:
        return f"derive width {student['derive']['width']:.3g} depth {student['derive']['depth']:.3g}"
    family = student["family"]
    if family in ("mlp", "embedding_bag"):
        return f"{family} {student['hidden']}" + (f" dim {student['embedding_dim']}" if "embedding_dim" in student
                                                  else "")
    if family == "cnn":
        return f"cnn {student['channels']}"
    if family == "resnet":
        return f"resnet depth {student['depth']} width {student['width']}"
    return f"text_transformer {student['layers']}×{student['d_model']} heads {student['heads']}"


def trial_spec(parent: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's stored spec: the parent's (JSON, defaults filled) with ``search`` and ``tracking`` removed, the
    sampled student, and the sampled ``temperature`` / ``alpha`` / ``lr`` in every distill step that has them."""
    spec = {k: v for k, v in parent.items() if k not in ("search", "tracking")}
    spec["student"] = student_config(params)
    steps = []
    for step in parent["steps"]:
        step = dict(step)
        if step.get("kind") == "distill":
            loss = dict(step.get("loss") or {})
            if "temperature" in params and loss.get("type") in ("kd", "soft_ce"):
                loss["temperature"] = float(params["temperature"])
            if "alpha" in params and loss.get("type") == "kd":
                loss["alpha"] = float(params["alpha"])
            step["loss"] = loss
            if "lr" in params:
                step["optimizer"] = {**(step.get("optimizer") or {}), "lr": float(params["lr"])}
        steps.append(step)
    spec["steps"] = steps
    return spec
