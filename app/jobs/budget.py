"""Job budgets, checked before 202: how big, how hungry and how long a job is, from metadata alone.

:func:`estimate` is pure arithmetic (no torch, no file I/O) on the validated :class:`JobSpec` and
the rows of the registered inputs it reads: the teacher :class:`Model` (``num_parameters``,
``format``, ``architecture``, ``io_schema``), the :class:`Dataset` rows (``num_rows``,
``size_bytes``, ``format`` and ``schema_`` with the arrays' shapes and dtypes) and, for
``student: {"model_id"}``, the uploaded student's row. :func:`check` compares an estimate with the
deployment's ``DISTILLERY_MAX_JOB_*`` settings and raises :class:`app.errors.BudgetExceeded`
(422 ``budget_exceeded``) naming the estimate, the limit and the setting to change.

The estimate is a **sizing**, not a prediction: it must catch the job that cannot possibly fit
(a 32×65536 MLP, 10 M synthetic rows of 10^6 values) without refusing ordinary jobs. Where a number
cannot be known before the files are opened (the output width of a TorchScript teacher, the
vocabulary of token ids) the smallest value the engine could use is taken and the guess is listed
in :attr:`Estimate.assumptions`; the executor's own limits catch what remains.

Formulas (every byte count is float32, 4 bytes, except integer token ids, which the engine holds as
int64, 8 bytes):

**Parameters** - the largest model the job holds at once: the teacher (its registered
``num_parameters``), the student of each step, the data-free generator. Built-in student families
are counted *exactly* as :mod:`engine.students.families` builds them from their config, the data's
row shape and the teacher's output width (``tests/jobs/test_budget.py`` compares the counts with
the real torch modules): e.g. ``mlp`` is Σ (w_in·w_out + w_out) over [in, *hidden, out]. A
``derive`` student is the teacher's architecture shrunk as :mod:`engine.students.derive` does when
the teacher's architecture is a built-in family. A layer chain (a TorchScript teacher) is shrunk
from layers the API never sees, so it is sized roughly as ``teacher_parameters · width² · (1 +
depth)/2`` (widths scale both sides of the hidden weight matrices; depth keeps whole blocks, rounded
up, and always the head); it never exceeds the teacher, which is counted too. An
uploaded student counts its registered ``num_parameters``; no student means the steps edit a copy
of the teacher. ``input_reduction`` rebuilds the student for ``components`` inputs behind a fixed
``in × components`` linear layer.

**Memory** (the peak over the steps; what the engine keeps resident):

* teacher weights: ``P_t · 4``;
* the student being trained (with no student: the teacher's editable copy): ``P_s · 4 · (1 weights
  + 1 gradients + optimizer state)``, the state being 2 tensors for Adam/AdamW (first and second
  moments), 1 for SGD with momentum, 0 without; +1 copy for early stopping's best weights and for
  ``baseline``'s initial weights; steps that do not train hold the weights and one copy;
* activations: ``batch_size · A · 4 · 2`` where ``A`` is the sum of the layer output sizes of one
  row (kept for the backward pass, ×2 for their gradients); the teacher's forward over a batch adds
  ``batch_size · A_t · 4`` (no gradients) and its output width when ``A_t`` is unknown;
* data: every dataset the job reads, ``rows · row size`` for each loaded array (inputs, labels,
  the ``*_val`` split), twice for the dataset the held-out rows are split from in memory (the split
  copies its rows); an ``npz`` file over 512 MiB is memory-mapped by the engine and only counts
  one batch, like the engine's ``NPZ_MMAP_THRESHOLD``. Cached teacher outputs, ``rows · outputs ·
  4`` per transfer set (none when the step augments: the teacher then runs per batch), stay
  resident up to 1 GiB (beyond it the engine memory-maps them as float16, ``CACHE_MEMORY_LIMIT``);
* ``synthesize``: the samples, ``num_samples · row size · 4 · 2`` (the generated chunks and their
  concatenation exist together for a moment), plus the generator trained with Adam (4 copies of its
  weights) and its activations for a 256-row batch.

**FLOPs** - a forward pass of one row costs ``F`` (``2·P`` for dense layers: one multiply and one
add per weight; exact per family where weights are shared - convolutions count ``2·k²·c_in·c_out``
per output position, embeddings a lookup of ``seq_len · dim``, attention ``4·L·d`` per token per
layer). Training a row costs ``3·F`` (the backward pass is about twice the forward) and every
optimizer step touches each parameter ``~10`` times (Adam; ``4`` for SGD). Per step:

* distill: ``epochs · rows · 3·F_s`` (``rows`` after the held-out split, the coreset fraction, or
  ``num_samples`` less the held-out tenth of a data-free job's first synthetic set), ``+ rows · F_t``
  once per transfer set for the cached teacher outputs (``epochs · rows · F_t`` when augmenting),
  ``+ epochs · val_rows · F_s`` for the per-epoch evaluation; ``baseline`` trains the same student
  again on labels; a k-means coreset adds ``20 · 3 · rows · k · row_size`` (Lloyd iterations);
* prune: ``iterations · finetune.epochs`` of the same training, or one evaluation per iteration;
* quantize: ``calibration_rows · F_s`` (static), QAT trains like distill;
* synthesize: ``generator_epochs · min(50, ⌈num_samples/256⌉) · 256 · 3·(F_gen + F_t)`` (the
  gradient flows through the frozen teacher into the generator), ``+ num_samples · F_gen``;
* once: the teacher over the held-out rows, ``val_rows · F_t``.

**Seconds** = ``flops / DISTILLERY_BUDGET_FLOPS_PER_SECOND`` (the sustained rate the deployment
assumes for its workers).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.db.models import Dataset, Model
from app.errors import BudgetExceeded
from jobspec import (
    DerivedStudent,
    DistillStep,
    JobSpec,
    PruneStep,
    QuantizeStep,
    UploadedStudent,
)
from app.settings import Settings, get_settings
from jobspec import training

AUTO_LR_BATCHES = training.AUTO_LR_BATCHES
AUTO_TEMPERATURE_BATCHES = training.AUTO_TEMPERATURE_BATCHES
FLOAT_BYTES = 4
INT_BYTES = 8  # token ids are int64 in the engine (``engine.training.tables``)
#: The engine memory-maps npz files larger than this (``engine.data.npz.NPZ_MMAP_THRESHOLD``).
NPZ_MMAP_THRESHOLD = 512 * 1024 * 1024
#: Teacher-output caches larger than this go to disk (``engine.training.tables.CACHE_MEMORY_LIMIT``).
CACHE_MEMORY_LIMIT = 1 << 30
#: Optimizer-step FLOPs per parameter (Adam reads/writes two moments; SGD one momentum buffer).
OPTIMIZER_FLOPS = {"adam": 10, "adamw": 10, "sgd": 4}
#: Data-free generator batch and iteration cap (``engine.compression.datafree``).
GENERATOR_BATCH = 256
GENERATOR_MAX_ITERATIONS = 50
SYNTHETIC_VAL_FRACTION = 0.1


# ---- model costs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCost:
    """One model the job holds: exact parameter count, forward FLOPs and activations per row."""

    label: str
    parameters: int
    forward_flops: int  # one forward pass of one example row
    activations: int  # floats of layer outputs of one row (kept for backward while training)
    loc: tuple[Any, ...] = ("body",)

    def named(self, label: str, loc: tuple[Any, ...]) -> ModelCost:
        return ModelCost(label, self.parameters, self.forward_flops, self.activations, loc)


def _dims(hidden: Iterable[Any]) -> list[int]:
    return [int(h) for h in hidden]


def _widths(hidden: list[int]) -> str:
    """``[65536 ×32]`` for repeated widths, else the list (shortened)."""
    if not hidden:
        return "[]"
    if len(hidden) > 1 and len(set(hidden)) == 1:
        return f"[{hidden[0]} ×{len(hidden)}]"
    shown = ", ".join(str(h) for h in hidden[:6]) + (", …" if len(hidden) > 6 else "")
    return f"[{shown}]"


def _linear_chain(width: int, hidden: list[int], out: int, *, act_per_hidden: int = 2) -> tuple[int, int, int]:
    """(params, flops, activations) of Linear(width→h)→act … → Linear(→out)."""
    params = flops = acts = 0
    for h in [*hidden, out]:
        params += width * h + h
        flops += 2 * width * h
        width = h
    acts = sum(hidden) * act_per_hidden + out
    return params, flops, acts


def _image_shape(shape: list[int]) -> tuple[int, int, int]:
    if len(shape) == 3:
        return shape[0], shape[1], shape[2]
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    # not an image: the engine refuses it in the job's first phase; size it as one channel row
    return 1, 1, max(1, math.prod(shape))


def _mlp(a: Mapping[str, Any]) -> ModelCost:
    hidden = _dims(a.get("hidden", [128]))
    inp = int(a["in_features"])
    params, flops, acts = _linear_chain(inp, hidden, int(a["out_features"]))
    return ModelCost(f"mlp {_widths(hidden)}", params, flops, acts + inp)


def _cnn(a: Mapping[str, Any]) -> ModelCost:
    c, h, w = _image_shape(_dims(a["input_shape"]))
    k = int(a.get("kernel_size", 3))
    channels = _dims(a.get("channels", [16, 32]))
    params = flops = acts = 0
    for ch in channels:
        pad = k // 2
        h, w = h + 2 * pad - k + 1, w + 2 * pad - k + 1
        params += c * ch * k * k + ch + 2 * ch  # conv weight + bias, batch-norm weight + bias
        flops += 2 * k * k * c * ch * h * w
        acts += 3 * ch * h * w  # conv, batch norm, relu
        c = ch
        if h >= 2 and w >= 2:
            h, w = h // 2, w // 2
            acts += c * h * w
    hidden = _dims(a.get("hidden", []))
    p2, f2, a2 = _linear_chain(c * h * w, hidden, int(a["out_features"]))
    return ModelCost(f"cnn channels {_widths(channels)}", params + p2, flops + f2, acts + a2)


def _conv_out(n: int, stride: int) -> int:
    return (n - 1) // stride + 1  # 3×3 padding 1, or 1×1 padding 0


def _resnet(a: Mapping[str, Any]) -> ModelCost:
    c_in, h, w = _image_shape(_dims(a["input_shape"]))
    width, depth = int(a.get("width", 16)), int(a.get("depth", 6))
    params = c_in * width * 9 + 2 * width
    flops = 2 * 9 * c_in * width * h * w
    acts = 3 * width * h * w
    c = width
    blocks = [depth // 3 + (1 if i < depth % 3 else 0) for i in range(3)]
    for stage, n in enumerate(blocks):
        for i in range(n):
            c_out = width * 2**stage
            stride = 2 if (i == 0 and stage > 0) else 1
            h, w = _conv_out(h, stride), _conv_out(w, stride)
            params += c * c_out * 9 + 2 * c_out + c_out * c_out * 9 + 2 * c_out
            flops += 2 * 9 * (c * c_out + c_out * c_out) * h * w
            acts += 6 * c_out * h * w
            if stride != 1 or c != c_out:
                params += c * c_out + 2 * c_out
                flops += 2 * c * c_out * h * w
                acts += 2 * c_out * h * w
            c = c_out
    out = int(a["out_features"])
    params += c * out + out
    flops += 2 * c * out
    return ModelCost(f"resnet depth {depth} width {width}", params, flops, acts + c + out)


def _embedding_bag(a: Mapping[str, Any]) -> ModelCost:
    vocab, dim = int(a["vocab_size"]), int(a.get("embedding_dim", 64))
    seq = int(a.get("seq_len", 1))
    hidden = _dims(a.get("hidden", []))
    p2, f2, a2 = _linear_chain(dim, hidden, int(a["out_features"]))
    return ModelCost(f"embedding_bag vocab {vocab} dim {dim} hidden {_widths(hidden)}", vocab * dim + p2,
                     seq * dim + f2, seq * dim + dim + a2)


def _text_transformer(a: Mapping[str, Any]) -> ModelCost:
    vocab, d = int(a["vocab_size"]), int(a.get("d_model", 64))
    layers, heads, ff = int(a.get("layers", 2)), int(a.get("heads", 4)), int(a.get("ff", 128))
    max_len = int(a.get("max_len", 512))
    seq = int(a.get("seq_len", max_len))
    out = int(a["out_features"])
    # in_proj (3d×d + 3d), out_proj (d×d + d), linear1 (d×ff + ff), linear2 (ff×d + d), 2 layer norms (2·2d)
    per_layer = 4 * d * d + 4 * d + 2 * d * ff + ff + d + 4 * d
    params = vocab * d + max_len * d + layers * per_layer + d * out + out
    per_token = 2 * (4 * d * d + 2 * d * ff) + 4 * seq * d
    flops = seq * d + layers * seq * per_token + 2 * d * out
    acts = seq * d + layers * (seq * (10 * d + 2 * ff) + heads * seq * seq) + d + out
    return ModelCost(f"text_transformer d_model {d} layers {layers} ff {ff} vocab {vocab}", params, flops, acts)


#: The families a registered model's ``architecture`` may name (``app.catalog`` refuses others).
_FAMILIES = {"mlp": _mlp, "cnn": _cnn, "resnet": _resnet, "embedding_bag": _embedding_bag,
             "text_transformer": _text_transformer}


def architecture_cost(architecture: Mapping[str, Any] | None) -> ModelCost | None:
    """Cost of a built-in family's architecture dict (:func:`engine.students.architecture.from_architecture`
    keys, plus ``seq_len`` for token families); None when it is not one."""
    fn = _FAMILIES.get(str(architecture.get("family"))) if isinstance(architecture, Mapping) else None
    if fn is None:
        return None
    try:
        return fn(architecture)
    except (KeyError, TypeError, ValueError):
        return None


def _scale(n: int, r: float) -> int:
    return max(1, int(round(n * r)))


def _kept(values: list[int], width: float, depth: float) -> list[int]:
    """The ⌈depth·n⌉ evenly spaced entries of ``values`` the engine keeps, each scaled by ``width``."""
    n = len(values)
    if n == 0:
        return []
    k = max(1, math.ceil(depth * n - 1e-9))
    return [_scale(values[i], width) for i in sorted({(i * n) // k for i in range(k)})]


def derive_architecture(arch: Mapping[str, Any], width: float, depth: float, out_dim: int) -> dict[str, Any]:
    """The architecture :func:`engine.students.derive.derive_architecture` makes (same rounding, same
    kept layers; ``tests/jobs/test_budget.py`` compares the two)."""
    a = {k: v for k, v in arch.items() if k not in ("init_from_teacher", "derived_from", "source")}
    family = a["family"]
    a["out_features"] = int(out_dim)
    if family == "mlp":
        a["hidden"] = _kept(_dims(a.get("hidden", [128])), width, depth)
    elif family == "cnn":
        a["channels"] = _kept(_dims(a.get("channels", [16, 32])), width, depth)
        a["hidden"] = _kept(_dims(a.get("hidden", [])), width, depth)
    elif family == "resnet":
        a["width"] = _scale(int(a.get("width", 16)), width)
        a["depth"] = max(1, math.ceil(int(a.get("depth", 6)) * depth - 1e-9))
    elif family == "embedding_bag":
        a["embedding_dim"] = _scale(int(a.get("embedding_dim", 64)), width)
        a["hidden"] = _kept(_dims(a.get("hidden", [])), width, depth)
    elif family == "text_transformer":
        heads = int(a.get("heads", 4))
        a["d_model"] = max(heads, int(round(int(a.get("d_model", 64)) * width / heads)) * heads)
        a["ff"] = _scale(int(a.get("ff", 128)), width)
        a["layers"] = max(1, math.ceil(int(a.get("layers", 2)) * depth - 1e-9))
    return a


def generator_cost(shape: list[int], latent_dim: int) -> ModelCost:
    """The DAFL generator :func:`engine.compression.datafree.make_generator` builds for rows of ``shape``."""
    if len(shape) == 3 and shape[1] % 4 == 0 and shape[2] % 4 == 0 and min(shape[1:]) >= 8:
        c, h, w = shape
        h0, w0, wide, base = h // 4, w // 4, 128, 64
        params = (latent_dim * wide * h0 * w0 + wide * h0 * w0 + 2 * wide + wide * wide * 9 + wide + 2 * wide
                  + wide * base * 9 + base + 2 * base + base * c * 9 + c + 2 * c)
        flops = (2 * latent_dim * wide * h0 * w0 + 2 * 9 * wide * wide * (2 * h0) * (2 * w0)
                 + 2 * 9 * (wide * base + base * c) * h * w)
        acts = 2 * wide * h0 * w0 + 3 * wide * 4 * h0 * w0 + 3 * base * h * w + 3 * c * h * w
        return ModelCost(f"generator for {list(shape)} rows", params, flops, acts)
    out = max(1, math.prod(shape))
    hidden = 256
    params = (latent_dim * hidden + hidden + 2 * hidden + hidden * 2 * hidden + 2 * hidden + 4 * hidden
              + 2 * hidden * out + out + 2 * out)
    flops = 2 * (latent_dim * hidden + hidden * 2 * hidden + 2 * hidden * out)
    acts = 3 * hidden + 3 * 2 * hidden + 3 * out
    return ModelCost(f"generator for {list(shape)} rows", params, flops, acts)


# ---- data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Data:
    """What the budget needs from a dataset row's schema."""

    rows: int
    inputs: list[str]
    shapes: dict[str, list[int]]  # per-row shape of each input
    arrays: dict[str, tuple[list[int], str]]  # every array: (full shape, dtype)
    memory_mapped: bool
    classes: int | None

    @property
    def val_rows(self) -> int | None:
        """Rows of the ``*_val`` split, when the dataset has one."""
        val = self.arrays.get(f"{self.inputs[0]}_val")
        return val[0][0] if val and val[0] else None

    def resident_bytes(self, batch: int) -> int:
        """The arrays the engine loads (inputs, labels, held-out split), at the engine's dtypes."""
        total = 0
        for name, (shape, dtype) in self.arrays.items():
            base = name.removesuffix("_val")
            if (base not in self.inputs and base != "y") or not shape:
                continue
            size = INT_BYTES if _is_int(dtype) else FLOAT_BYTES
            rows = min(shape[0], batch) if self.memory_mapped and base != "y" else shape[0]
            total += rows * math.prod(shape[1:]) * size
        return total


def _is_int(dtype: str) -> bool:
    return str(dtype).lower().removeprefix("torch.").startswith(("int", "uint", "long"))


def _data(ds: Dataset) -> _Data | None:
    schema = ds.schema_ or {}
    inputs = list(schema.get("inputs") or ["x"])
    arrays: dict[str, tuple[list[int], str]] = {}
    for name, meta in (schema.get("arrays") or {}).items():
        try:
            arrays[str(name)] = ([int(d) for d in meta.get("shape", [])], str(meta.get("dtype", "float32")))
        except (AttributeError, TypeError, ValueError):
            continue
    if not all(arrays.get(n, ([], ""))[0] for n in inputs):
        return None
    classes = schema.get("classes")
    return _Data(
        rows=int(ds.num_rows or arrays[inputs[0]][0][0]), inputs=inputs,
        shapes={n: arrays[n][0][1:] for n in inputs}, arrays=arrays,
        memory_mapped=ds.format == "npz" and int(ds.size_bytes or 0) > NPZ_MMAP_THRESHOLD,
        classes=len(classes) if isinstance(classes, list) and classes else None,
    )


# ---- the estimate ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """What a job needs, before it is queued (see the module docstring for every formula)."""

    parameters: int  # the largest model the job holds
    memory_bytes: int  # peak resident bytes
    flops: int  # total floating-point operations
    seconds: float  # flops / budget_flops_per_second
    largest: str = ""  # which model ``parameters`` is, e.g. "student of step 0: mlp [64]"
    largest_loc: tuple[Any, ...] = ("body",)
    memory_items: dict[str, int] = field(default_factory=dict)  # the peak's parts
    models: dict[str, int] = field(default_factory=dict)  # label -> parameters
    assumptions: tuple[str, ...] = ()


def _out_dim(teacher: Model, data: list[_Data], notes: list[str]) -> int:
    arch = teacher.architecture if isinstance(teacher.architecture, Mapping) else {}
    if arch.get("out_features"):
        return int(arch["out_features"])
    for out in (teacher.io_schema or {}).get("outputs") or []:
        shape = out.get("shape") if isinstance(out, Mapping) else None
        if shape and isinstance(shape[-1], int) and shape[-1] > 0:
            return int(shape[-1])
    for d in data:
        if d.classes:
            return d.classes
    notes.append(f"the teacher's output width is not known before the job runs ({teacher.format}); assumed 1")
    return 1


def _vocab(config_vocab: int | None, teacher_arch: Mapping[str, Any], notes: list[str], family: str) -> int:
    if config_vocab is not None:
        return int(config_vocab)
    if teacher_arch.get("vocab_size"):
        return int(teacher_arch["vocab_size"])
    notes.append(f"student {family}: vocab_size is inferred from the token ids when the job runs; assumed 2")
    return 2


def _family_architecture(student: Any, shapes: dict[str, list[int]], inputs: list[str], out_dim: int,
                         teacher_arch: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    """The architecture dict ``family.create()`` would build (mirrors engine/students/families.py)."""
    family = student.family
    shape = shapes[inputs[0]]
    if family == "mlp":
        return {"family": "mlp", "in_features": max(1, math.prod(shape)), "hidden": list(student.hidden),
                "out_features": out_dim}
    if family == "cnn":
        return {"family": "cnn", "input_shape": shape, "channels": list(student.channels),
                "kernel_size": student.kernel_size, "hidden": list(student.hidden), "out_features": out_dim}
    if family == "resnet":
        return {"family": "resnet", "input_shape": shape, "depth": student.depth, "width": student.width,
                "out_features": out_dim}
    seq = int(shape[0]) if shape else 1
    vocab = _vocab(student.vocab_size, teacher_arch, notes, family)
    if family == "embedding_bag":
        dim = student.embedding_dim
        if dim is None:
            dim = (int(teacher_arch.get("embedding_dim", teacher_arch.get("d_model", 64)))
                   if student.init == "teacher" and teacher_arch.get("vocab_size") else 64)
        return {"family": "embedding_bag", "vocab_size": vocab, "embedding_dim": int(dim),
                "hidden": list(student.hidden), "out_features": out_dim, "seq_len": seq}
    if family == "text_transformer":
        return {"family": "text_transformer", "vocab_size": vocab, "d_model": student.d_model,
                "layers": student.layers, "heads": student.heads, "ff": student.ff,
                "max_len": int(student.max_len or seq), "out_features": out_dim, "seq_len": seq}
    raise ValueError(f"unknown student family {family!r}")


def _teacher_cost(teacher: Model, shapes: dict[str, list[int]], inputs: list[str], out_dim: int) -> ModelCost:
    p = int(teacher.num_parameters or 0)
    arch = dict(teacher.architecture) if isinstance(teacher.architecture, Mapping) else None
    if arch is not None and "seq_len" not in arch and shapes.get(inputs[0]):
        arch["seq_len"] = int(shapes[inputs[0]][0])
    known = architecture_cost(arch)
    label = f"teacher {teacher.id} ({teacher.format})"
    loc = ("body", "teacher_model_id")
    if known is not None:
        return ModelCost(label, p, known.forward_flops, known.activations, loc)
    return ModelCost(label, p, 2 * p, out_dim + max(1, math.prod(shapes[inputs[0]])), loc)


def _student_cost(spec: JobSpec, teacher: Model, teacher_cost: ModelCost, student_model: Model | None,
                  shapes: dict[str, list[int]], inputs: list[str], out_dim: int, notes: list[str]) -> ModelCost:
    """The job's student as the engine builds it before the first step."""
    student = spec.student
    t_arch = teacher.architecture if isinstance(teacher.architecture, Mapping) else {}
    if student is None:
        return teacher_cost.named("the teacher's editable copy", ("body", "teacher_model_id"))
    if isinstance(student, UploadedStudent):
        p = int(student_model.num_parameters) if student_model is not None else 0
        arch = student_model.architecture if student_model is not None else None
        known = architecture_cost(arch)
        label = f"uploaded student {student.model_id}"
        loc = ("body", "student", "model_id")
        if known is not None:
            return ModelCost(label, p, known.forward_flops, known.activations, loc)
        return ModelCost(label, p, 2 * p, out_dim, loc)
    if isinstance(student, DerivedStudent):
        r = student.derive
        loc = ("body", "student", "derive")
        if t_arch.get("family") in _FAMILIES:
            new = derive_architecture(t_arch, r.width, r.depth, out_dim)
            if "seq_len" not in new and shapes.get(inputs[0]):
                new["seq_len"] = int(shapes[inputs[0]][0])
            known = architecture_cost(new)
            if known is not None:
                return known.named(f"derived {known.label}", loc)
        factor = r.width * r.width * (1 + r.depth) / 2
        p = int(math.ceil(teacher_cost.parameters * factor))
        return ModelCost(f"teacher shrunk ×{r.width:g} width, ×{r.depth:g} depth", p,
                         int(math.ceil(teacher_cost.forward_flops * factor)),
                         int(math.ceil(teacher_cost.activations * r.width)), loc)
    arch = _family_architecture(student, shapes, inputs, out_dim, t_arch, notes)
    cost = _FAMILIES[arch["family"]](arch)
    return cost.named(cost.label, ("body", "student"))


def _optimizer_copies(opt: Any) -> int:
    if opt.type in ("adam", "adamw"):
        return 2
    return 1 if opt.momentum > 0 else 0


def estimate(spec: JobSpec, teacher: Model, datasets: Mapping[str, Dataset], student_model: Model | None = None,
             *, settings: Settings | None = None) -> Estimate:
    """Size the job ``spec`` describes (see the module docstring for the formulas and why)."""
    settings = settings or get_settings()
    notes: list[str] = []
    data: dict[str, _Data] = {}
    for ds_id in spec.dataset_ids():
        ds = datasets.get(ds_id)
        parsed = _data(ds) if ds is not None else None
        if parsed is not None:
            data[ds_id] = parsed
        elif ds is not None:
            notes.append(f"dataset {ds_id}: no array shapes in its schema; its memory is not counted")
    first = next(iter(data.values()), None)
    if first is not None:
        inputs, shapes = first.inputs, first.shapes
    else:
        inputs, shapes = ["x"], {"x": list(spec.input_spec.shape) if spec.input_spec is not None else [1]}
    row_elems = max(1, math.prod(shapes[inputs[0]]))
    synthetic_shape = list(spec.input_spec.shape) if spec.input_spec is not None else shapes[inputs[0]]
    t_arch = teacher.architecture if isinstance(teacher.architecture, Mapping) else {}

    out_dim = _out_dim(teacher, list(data.values()), notes)
    t_cost = _teacher_cost(teacher, shapes, inputs, out_dim)
    current = _student_cost(spec, teacher, t_cost, student_model, shapes, inputs, out_dim, notes)
    models: dict[str, ModelCost] = {t_cost.label: t_cost}

    # The held-out rows, chosen as engine.data.plan does: the eval dataset, else x_val or a split of
    # the job's (or the first step's) dataset, else the last tenth of the first synthetic set.
    held_from: str | None = None
    val_rows = 0
    if spec.eval_dataset_id is not None:
        if (ev := data.get(spec.eval_dataset_id)) is not None:
            val_rows = ev.val_rows or ev.rows
    else:
        held_from = spec.dataset_id or next((s.dataset_id for s in spec.steps if getattr(s, "dataset_id", None)), None)
        if (d := data.get(held_from or "")) is not None:
            val_rows = d.val_rows or min(max(1, int(round(d.rows * spec.val_fraction))), max(1, d.rows - 1))
    synthetic_val = spec.eval_dataset_id is None and held_from is None

    def split_here(ds_id: str | None) -> bool:
        return ds_id == held_from and ds_id in data and data[ds_id].val_rows is None

    def train_rows(ds_id: str | None) -> int:
        if ds_id is None or ds_id not in data:
            return 0
        return data[ds_id].rows - (val_rows if split_here(ds_id) else 0)

    teacher_bytes = t_cost.parameters * FLOAT_BYTES
    max_batch = max([getattr(s, "batch_size", 0) for s in spec.steps]
                    + [s.finetune.batch_size for s in spec.steps if getattr(s, "finetune", None)] + [1])
    data_bytes: dict[str, int] = {}
    for ds_id, d in data.items():
        if split_here(ds_id) and not d.memory_mapped:
            data_bytes[f"dataset {ds_id} and its train/held-out split"] = 2 * d.resident_bytes(max_batch)
        else:
            data_bytes[f"dataset {ds_id}"] = d.resident_bytes(max_batch)
    resident_extra: dict[str, int] = {}  # caches and synthetic samples, kept for the rest of the job
    cached: set[str] = set()
    flops = val_rows * t_cost.forward_flops  # teacher over the held-out rows, once
    peak: dict[str, int] = {}

    def cache(key: str, rows: int) -> None:
        nonlocal flops
        if key in cached:
            return
        cached.add(key)
        flops += rows * t_cost.forward_flops
        size = rows * out_dim * FLOAT_BYTES
        if size <= CACHE_MEMORY_LIMIT:
            resident_extra[f"teacher outputs cached for {key}"] = size

    def train(model: ModelCost, rows: int, epochs: int, batch: int, optimizer: Any) -> int:
        batches = math.ceil(rows / max(1, batch)) * epochs
        return (3 * model.forward_flops * rows * epochs + OPTIMIZER_FLOPS.get(optimizer.type, 10)
                * model.parameters * batches + model.forward_flops * val_rows * epochs)

    def step_memory(i: int, model: ModelCost, batch: int, optimizer: Any | None, extra_copies: int,
                    transient: dict[str, int]) -> None:
        items = {f"teacher weights ({format_count(t_cost.parameters)} parameters)": teacher_bytes, **data_bytes,
                 **resident_extra}
        copies = 1 + ((1 + _optimizer_copies(optimizer)) if optimizer is not None else 0) + extra_copies
        what = "weights, gradients and optimizer state" if optimizer is not None else "weights"
        items[f"student of step {i}: {what} ({format_count(model.parameters)} parameters × {copies})"] = (
            model.parameters * FLOAT_BYTES * copies)
        if optimizer is not None:
            items[f"activations of step {i} (batch {batch})"] = batch * model.activations * FLOAT_BYTES * 2
            items[f"teacher forward of step {i} (batch {batch})"] = batch * t_cost.activations * FLOAT_BYTES
        items.update(transient)
        if sum(items.values()) > sum(peak.values()):
            peak.clear()
            peak.update(items)

    for i, step in enumerate(spec.steps):
        label = f"student of step {i}"
        if isinstance(step, DistillStep):
            if step.input_reduction is not None:  # a fresh student of the family for k inputs, behind d -> k
                k = step.input_reduction.components
                inner = current
                if hasattr(spec.student, "family"):
                    arch = _family_architecture(spec.student, {inputs[0]: [k]}, inputs, out_dim, t_arch, notes)
                    inner = _FAMILIES[arch["family"]](arch)
                current = ModelCost(f"{inner.label} behind a {row_elems}→{k} input reduction",
                                    inner.parameters + row_elems * k + k, inner.forward_flops + 2 * row_elems * k,
                                    inner.activations + row_elems + k, ("body", "steps", i, "input_reduction"))
            transient: dict[str, int] = {}
            if step.synthesize is not None:
                syn = step.synthesize
                gen = generator_cost(synthetic_shape, syn.latent_dim).named(
                    f"generator of step {i}", ("body", "steps", i, "synthesize"))
                models[gen.label] = gen
                iters = max(1, min(GENERATOR_MAX_ITERATIONS, math.ceil(syn.num_samples / GENERATOR_BATCH)))
                flops += (syn.generator_epochs * iters * GENERATOR_BATCH * 3 * (gen.forward_flops + t_cost.forward_flops)
                          + syn.num_samples * gen.forward_flops)
                sample_bytes = syn.num_samples * max(1, math.prod(synthetic_shape)) * FLOAT_BYTES
                transient[f"generator of step {i} (Adam: {format_count(gen.parameters)} parameters × 4)"] = (
                    gen.parameters * FLOAT_BYTES * 4 + GENERATOR_BATCH * gen.activations * FLOAT_BYTES * 2)
                transient[f"synthetic samples of step {i} being drawn"] = sample_bytes
                resident_extra[f"synthetic data of step {i}: {syn.num_samples} × {synthetic_shape}"] = sample_bytes
                rows = syn.num_samples
                if synthetic_val:  # data-free: the held-out rows are the last tenth of the first synthetic set
                    synthetic_val = False
                    val_rows = max(1, int(round(syn.num_samples * SYNTHETIC_VAL_FRACTION)))
                    flops += val_rows * t_cost.forward_flops
                    rows -= val_rows
                cache_key = f"synthetic rows of step {i}"
            else:
                ds_id = step.dataset_id or spec.dataset_id
                rows = train_rows(ds_id)
                cache_key = f"dataset {ds_id}"
                if step.coreset is not None:
                    full = rows
                    rows = max(1, min(full, int(round(full * step.coreset.fraction))))
                    cache_key += f" (coreset {step.coreset.method} {step.coreset.fraction:g})"
                    if step.coreset.method == "kmeans" and rows < full:
                        transient[f"coreset k-means points of step {i}"] = full * row_elems * FLOAT_BYTES
                        flops += 20 * 3 * full * rows * row_elems  # 20 Lloyd iterations of distances
            a = step.augment
            epochs = step.max_epochs  # "auto": its upper bound
            if a is not None and (a.flip or a.shift or a.noise or a.mixup):
                flops += epochs * rows * t_cost.forward_flops  # the teacher sees every augmented batch
            else:
                cache(cache_key, rows)
            flops += train(current, rows, epochs, step.batch_size, step.optimizer) * (2 if spec.baseline else 1)
            # "auto" lr / temperature: the range test's and the sweep's batches (engine.training.autotune)
            auto_batches = (AUTO_LR_BATCHES * (step.optimizer.lr == "auto")
                            + AUTO_TEMPERATURE_BATCHES * (getattr(step.loss, "temperature", None) == "auto"))
            if auto_batches:
                flops += train(current, auto_batches * step.batch_size, 1, step.batch_size, step.optimizer)
            keeps_best = step.early_stopping is not None or step.schedule.type == "plateau"
            step_memory(i, current, step.batch_size, step.optimizer, int(keeps_best) + int(spec.baseline)
                        + int(auto_batches > 0), transient)
        elif isinstance(step, PruneStep | QuantizeStep):
            ft = step.finetune
            rounds = step.iterations if isinstance(step, PruneStep) else 1
            if ft is not None:
                cache(f"dataset {spec.dataset_id}", train_rows(spec.dataset_id))
                flops += rounds * train(current, train_rows(spec.dataset_id), ft.epochs, ft.batch_size, ft.optimizer)
                step_memory(i, current, ft.batch_size, ft.optimizer, 0, {})
            else:
                flops += rounds * val_rows * current.forward_flops
                step_memory(i, current, 0, None, 1, {})
            if isinstance(step, QuantizeStep) and step.method in ("static_int8", "onnx_int8"):
                flops += step.calibration_rows * current.forward_flops
        models[f"{label}: {current.label}"] = current.named(f"{label}: {current.label}", current.loc)
        flops += val_rows * current.forward_flops  # the step's output measured on the held-out rows

    largest = max(models.values(), key=lambda m: m.parameters)
    return Estimate(
        parameters=largest.parameters, memory_bytes=sum(peak.values()), flops=int(flops),
        seconds=flops / settings.budget_flops_per_second,
        largest=largest.label, largest_loc=largest.loc,
        memory_items=dict(sorted(peak.items(), key=lambda kv: -kv[1])),
        models={m.label: m.parameters for m in models.values()},
        assumptions=tuple(dict.fromkeys(notes)),
    )


# ---- the check ---------------------------------------------------------------------------------


def format_count(n: float) -> str:
    """133.2 G, 1.0 G, 52.3 M, 810 (decimal prefixes, as parameter counts are quoted)."""
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)}"


def format_bytes(n: float) -> str:
    """16.0 GiB (binary prefixes, as memory is sold)."""
    for unit, size in (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def format_seconds(s: float) -> str:
    if s >= 86400:
        return f"{s / 86400:.1f} days"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def check(est: Estimate, settings: Settings) -> Estimate:
    """Raise :class:`BudgetExceeded` when ``est`` is over any of the deployment's job limits; else return it.

    The detail names the first limit crossed (parameters, then memory, then time) with the estimate,
    the limit and the setting to raise; ``errors`` lists every crossed limit with the numbers.
    """
    exceeded: list[dict[str, Any]] = []
    if est.parameters > settings.max_job_parameters:
        exceeded.append({
            "loc": list(est.largest_loc), "type": "budget_exceeded", "resource": "parameters",
            "estimate": est.parameters, "limit": settings.max_job_parameters,
            "setting": "DISTILLERY_MAX_JOB_PARAMETERS",
            "msg": f"the job needs about {format_count(est.parameters)} parameters ({est.largest}); this "
                   f"deployment allows {format_count(settings.max_job_parameters)} parameters "
                   f"(DISTILLERY_MAX_JOB_PARAMETERS)",
        })
    if est.memory_bytes > settings.max_job_memory_bytes:
        top = ", ".join(f"{k}: {format_bytes(v)}" for k, v in list(est.memory_items.items())[:2])
        exceeded.append({
            "loc": ["body"], "type": "budget_exceeded", "resource": "memory_bytes",
            "estimate": est.memory_bytes, "limit": settings.max_job_memory_bytes,
            "setting": "DISTILLERY_MAX_JOB_MEMORY_BYTES",
            "msg": f"the job needs about {format_bytes(est.memory_bytes)} of memory ({top}); this deployment "
                   f"allows {format_bytes(settings.max_job_memory_bytes)} (DISTILLERY_MAX_JOB_MEMORY_BYTES)",
        })
    if est.seconds > settings.max_job_seconds:
        exceeded.append({
            "loc": ["body"], "type": "budget_exceeded", "resource": "seconds",
            "estimate": round(est.seconds, 1), "limit": settings.max_job_seconds,
            "setting": "DISTILLERY_MAX_JOB_SECONDS", "flops": est.flops,
            "flops_per_second": settings.budget_flops_per_second,
            "msg": f"the job needs about {format_seconds(est.seconds)} ({est.seconds:.0f} seconds) of compute "
                   f"({est.flops:.2e} FLOPs at the {settings.budget_flops_per_second:.2e} FLOP/s assumed, "
                   f"DISTILLERY_BUDGET_FLOPS_PER_SECOND); this deployment allows "
                   f"{format_seconds(settings.max_job_seconds)} ({settings.max_job_seconds} seconds, "
                   f"DISTILLERY_MAX_JOB_SECONDS)",
        })
    if exceeded:
        detail = exceeded[0]["msg"]
        if len(exceeded) > 1:
            detail += "; also " + "; ".join(e["msg"].removeprefix("the job ") for e in exceeded[1:])
        raise BudgetExceeded(detail, exceeded=exceeded)
    return est


def check_job(spec: JobSpec, teacher: Model, datasets: Mapping[str, Dataset], student_model: Model | None,
              settings: Settings) -> Estimate:
    """:func:`estimate` then :func:`check`: the one call ``create_job`` makes before 202."""
    if teacher is None or teacher.task == "causal_lm":
        from app.jobs.budget_lm import estimate_lm

        return check(estimate_lm(spec, teacher, datasets, student_model), settings)
    return check(estimate(spec, teacher, datasets, student_model, settings=settings), settings)
