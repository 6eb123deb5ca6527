"""Student model families (registry ``students``, selected by ``student.family``).

A family instance turns its config plus the data/teacher dimensions into a fresh model::

    family.create(inputs: list[InputInfo], out_dim: int, teacher: TeacherInfo | None = None)
        -> (nn.Module, architecture: dict)

* the model's ``forward`` takes one positional tensor per entry of ``inputs``, in that order,
  and returns [B, out_dim]. Float families (``mlp``, ``cnn``, ``resnet``) take one input;
  token families (``embedding_bag``, ``text_transformer``) take ``input_ids`` [B, L] int64 and
  optionally ``attention_mask`` [B, L] (second input; 0 = padding).
* (legacy) ``inputs`` may also be a plain per-row shape tuple such as ``(64,)``.
* ``architecture`` is a JSON-able dict that :func:`from_architecture` turns back into the
  same (untrained) module, so weights saved as safetensors can be reloaded without the spec.
  With ``init: "teacher"`` it also lists the copied state-dict keys in ``init_from_teacher``.

``from_architecture`` keys (``*`` = required, others default):

==================  ====================================================================================
``mlp``             in_features*, out_features*, hidden [128], activation relu, dropout 0
``cnn``             input_shape* ([C,H,W] or [H,W]), out_features*, channels [16,32], kernel_size 3,
                    hidden [], dropout 0
``resnet``          input_shape* ([C,H,W] or [H,W]), out_features*, depth 6, width 16
``embedding_bag``   vocab_size*, out_features*, embedding_dim 64, hidden []
``text_transformer`` vocab_size*, out_features*, max_len 512, d_model 64, layers 2, heads 4, ff 128
``sequential``      layers* (list of layer dicts, see :func:`build_sequential`) - derived chains
==================  ====================================================================================

Other entry points: :func:`init_from_teacher` (the ``init: teacher`` weight copy),
:func:`load_uploaded` (a trainable uploaded student), :func:`parse_student` (the whole
``student`` spec object: family, ``derive`` or ``model_id``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from torch import nn

import jobspec
from engine.registry import students
from engine.values import InputInfo
from engine.errors import InvalidModel, InvalidSpec, ShapeMismatch, Unsupported

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
Init = Literal["random", "teacher"]


# ---- helpers -------------------------------------------------------------------------------------


def normalize_inputs(inputs: Any) -> list[InputInfo]:
    """``list[InputInfo]``, or a legacy per-row shape tuple -> one float input named ``x``."""
    if isinstance(inputs, (tuple, list)) and all(isinstance(d, int) for d in inputs):
        return [InputInfo("x", tuple(int(d) for d in inputs), False, None)]
    out = list(inputs)
    if not out:
        raise ShapeMismatch("the student needs at least one input")
    return out


def _single_float_input(inputs: list[InputInfo], family: str) -> InputInfo:
    if len(inputs) != 1:
        raise Unsupported(f"student family {family!r} takes exactly one input, the data has {len(inputs)} "
            f"({', '.join(i.name for i in inputs)}); use embedding_bag or text_transformer for token ids + mask",
        )
    return inputs[0]


def _image_shape(shape: tuple[int, ...] | list[int], family: str) -> tuple[int, int, int]:
    shape = tuple(int(d) for d in shape)
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    if len(shape) == 2:
        return (1, shape[0], shape[1])
    raise ShapeMismatch(
        f"student family {family!r} needs image rows of shape C×H×W or H×W, the data has rows of shape {list(shape)}",
    )


def _token_inputs(inputs: list[InputInfo], family: str) -> tuple[InputInfo, InputInfo | None]:
    if not 1 <= len(inputs) <= 2:
        raise Unsupported(f"student family {family!r} takes input_ids and optionally attention_mask")
    ids = inputs[0]
    if not ids.is_integer or len(ids.row_shape) != 1:
        raise ShapeMismatch(f"student family {family!r} needs token ids (integer rows of shape [L]) as its first input; "
            f"{ids.name!r} has {'integer' if ids.is_integer else 'float'} rows of shape {list(ids.row_shape)}",
        )
    mask = inputs[1] if len(inputs) == 2 else None
    if mask is not None and tuple(mask.row_shape) != tuple(ids.row_shape):
        raise ShapeMismatch(f"{mask.name!r} must have the shape of {ids.name!r}")
    return ids, mask


def _type_name(module: nn.Module) -> str:
    """The Python class name, also for TorchScript modules (``original_name``)."""
    if isinstance(module, torch.jit.ScriptModule):
        return str(getattr(module, "original_name", type(module).__name__))
    return type(module).__name__


def _teacher_module(teacher: Any) -> nn.Module | None:
    return None if teacher is None else getattr(teacher, "module", None)


def _teacher_vocab(teacher: Any) -> tuple[int, int] | None:
    """(num_embeddings, dim) of the teacher's token-embedding table, when there is one."""
    module = _teacher_module(teacher)
    if module is not None:
        for name, kind, m in _units(module):
            if kind == "embedding" and not _is_position(name):
                w = m.weight
                return int(w.shape[0]), int(w.shape[1])
    arch = getattr(teacher, "architecture", None) if teacher is not None else None
    if isinstance(arch, Mapping) and arch.get("vocab_size"):
        return int(arch["vocab_size"]), int(arch.get("embedding_dim", arch.get("d_model", 64)))
    return None


def _resolve_vocab(config_vocab: int | None, ids: InputInfo, teacher: Any, family: str) -> int:
    needed = None if ids.max_value is None else int(ids.max_value) + 1
    if config_vocab is not None:
        vocab = int(config_vocab)
    else:
        tv = _teacher_vocab(teacher)
        if tv is not None and (needed is None or tv[0] >= needed):
            vocab = tv[0]
        elif needed is not None:
            vocab = max(needed, 2)
        else:
            raise InvalidSpec(f"student.vocab_size: cannot infer the vocabulary for {family!r}; set it")
    if needed is not None and vocab < needed:
        raise ShapeMismatch(f"student.vocab_size is {vocab} but {ids.name!r} contains token id {needed - 1}",
        )
    return vocab


def _finish(model: nn.Module, architecture: dict[str, Any], init: str, teacher: Any) -> tuple[nn.Module, dict]:
    if init == "teacher":
        module = _teacher_module(teacher)
        if module is None:
            raise Unsupported("student.init 'teacher' needs a PyTorch teacher (TorchScript, torch.export or safetensors), "
                "not an ONNX graph",
            )
        architecture["init_from_teacher"] = init_from_teacher(model, module)
    return model, architecture


# ---- mlp -----------------------------------------------------------------------------------------


class FloatFlatten(nn.Flatten):
    """``nn.Flatten`` that also casts integer inputs to float32 (no-op for float inputs)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input.flatten(self.start_dim, self.end_dim)
        if not x.is_floating_point():
            x = x.to(torch.float32)
        return x


@students.register("mlp")
class MLPStudent:
    """Flatten -> [Linear -> activation -> (Dropout)] * len(hidden) -> Linear."""

    Config = jobspec.MLPStudent

    def __init__(self, config: Config):
        self.config = config

    def create(self, inputs: Any, out_dim: int, teacher: Any = None) -> tuple[nn.Module, dict[str, Any]]:
        inp = _single_float_input(normalize_inputs(inputs), "mlp")
        architecture = {
            "family": "mlp",
            "in_features": int(math.prod(inp.row_shape)),
            "input_shape": [int(d) for d in inp.row_shape],
            "hidden": list(self.config.hidden),
            "out_features": int(out_dim),
            "activation": self.config.activation,
            "dropout": float(self.config.dropout),
        }
        return _finish(build_mlp(architecture), architecture, self.config.init, teacher)


def build_mlp(architecture: Mapping[str, Any]) -> nn.Sequential:
    """The ``nn.Sequential`` an mlp architecture dict describes (fresh weights).

    Layer indices are part of the safetensors key names ("1.weight", ...), so
    the layout must only ever change together with a format version bump.
    """
    act = _ACTIVATIONS[architecture.get("activation", "relu")]
    dropout = float(architecture.get("dropout", 0.0))
    layers: list[nn.Module] = [FloatFlatten()]
    width = int(architecture["in_features"])
    for h in architecture.get("hidden", [128]):
        layers += [nn.Linear(width, int(h)), act()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = int(h)
    layers.append(nn.Linear(width, int(architecture["out_features"])))
    return nn.Sequential(*layers)


# ---- cnn -----------------------------------------------------------------------------------------


@students.register("cnn")
class CNNStudent:
    """[Conv -> BatchNorm -> ReLU -> 2×2 MaxPool] per channel entry -> Flatten -> [Linear -> ReLU]* -> Linear."""

    Config = jobspec.CNNStudent

    def __init__(self, config: Config):
        self.config = config

    def create(self, inputs: Any, out_dim: int, teacher: Any = None) -> tuple[nn.Module, dict[str, Any]]:
        inp = _single_float_input(normalize_inputs(inputs), "cnn")
        _image_shape(inp.row_shape, "cnn")
        architecture = {
            "family": "cnn",
            "input_shape": [int(d) for d in inp.row_shape],
            "channels": list(self.config.channels),
            "kernel_size": int(self.config.kernel_size),
            "hidden": list(self.config.hidden),
            "dropout": float(self.config.dropout),
            "out_features": int(out_dim),
        }
        return _finish(build_cnn(architecture), architecture, self.config.init, teacher)


def build_cnn(architecture: Mapping[str, Any]) -> nn.Sequential:
    shape = [int(d) for d in architecture["input_shape"]]
    c, h, w = _image_shape(shape, "cnn")
    k = int(architecture.get("kernel_size", 3))
    dropout = float(architecture.get("dropout", 0.0))
    layers: list[nn.Module] = []
    if len(shape) == 2:
        layers.append(nn.Unflatten(1, (1, h)))
    for ch in architecture.get("channels", [16, 32]):
        pad = k // 2
        layers += [nn.Conv2d(c, int(ch), k, padding=pad), nn.BatchNorm2d(int(ch)), nn.ReLU()]
        h, w, c = h + 2 * pad - k + 1, w + 2 * pad - k + 1, int(ch)
        if h >= 2 and w >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
    layers.append(nn.Flatten())
    width = c * h * w
    for hid in architecture.get("hidden", []):
        layers += [nn.Linear(width, int(hid)), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = int(hid)
    layers.append(nn.Linear(width, int(architecture["out_features"])))
    return nn.Sequential(*layers)


# ---- resnet --------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """conv3×3 -> BN -> ReLU -> conv3×3 -> BN, plus the (1×1 conv + BN when needed) shortcut, -> ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def resnet_stage_blocks(depth: int) -> list[int]:
    """Blocks per stage: ``depth`` split over 3 stages, earlier stages first (7 -> [3, 2, 2])."""
    return [depth // 3 + (1 if i < depth % 3 else 0) for i in range(3)]


class ResNet(nn.Module):
    """CIFAR-style residual net: stem conv, 3 stages of width·(1, 2, 4) (stride 2 between), global pool, linear."""

    def __init__(self, in_channels: int, width: int, depth: int, out_features: int, add_channel: bool):
        super().__init__()
        self.add_channel = add_channel
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        blocks: list[nn.Module] = []
        c = width
        for stage, n in enumerate(resnet_stage_blocks(depth)):
            for i in range(n):
                c_out = width * 2**stage
                blocks.append(BasicBlock(c, c_out, 2 if (i == 0 and stage > 0) else 1))
                c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.add_channel:
            x = x.unsqueeze(1)
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@students.register("resnet")
class ResNetStudent:
    """A small residual network: a stem, ``depth`` basic blocks in 3 stages of ``width``·(1, 2, 4) channels."""

    Config = jobspec.ResNetStudent

    def __init__(self, config: Config):
        self.config = config

    def create(self, inputs: Any, out_dim: int, teacher: Any = None) -> tuple[nn.Module, dict[str, Any]]:
        inp = _single_float_input(normalize_inputs(inputs), "resnet")
        _image_shape(inp.row_shape, "resnet")
        architecture = {"family": "resnet", "input_shape": [int(d) for d in inp.row_shape],
                        "depth": int(self.config.depth), "width": int(self.config.width), "out_features": int(out_dim)}
        return _finish(build_resnet(architecture), architecture, self.config.init, teacher)


def build_resnet(architecture: Mapping[str, Any]) -> ResNet:
    shape = [int(d) for d in architecture["input_shape"]]
    c, _, _ = _image_shape(shape, "resnet")
    return ResNet(c, int(architecture.get("width", 16)), int(architecture.get("depth", 6)),
                  int(architecture["out_features"]), len(shape) == 2)


# ---- embedding_bag -------------------------------------------------------------------------------


def _masked_mean(h: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return h.mean(dim=1)
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def _mlp_head(width: int, hidden: list[int], out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers)


class EmbeddingBagNet(nn.Module):
    """Token embeddings, mean over the non-padding positions, MLP head."""

    def __init__(self, vocab_size: int, embedding_dim: int, hidden: list[int], out_features: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.head = _mlp_head(embedding_dim, hidden, out_features)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.head(_masked_mean(self.embedding(input_ids), attention_mask))


@students.register("embedding_bag")
class EmbeddingBagStudent:
    """Mean of token embeddings (mask-aware) -> MLP head; inputs input_ids [+ attention_mask]."""

    Config = jobspec.EmbeddingBagStudent

    def __init__(self, config: Config):
        self.config = config

    def create(self, inputs: Any, out_dim: int, teacher: Any = None) -> tuple[nn.Module, dict[str, Any]]:
        ids, mask = _token_inputs(normalize_inputs(inputs), "embedding_bag")
        vocab = _resolve_vocab(self.config.vocab_size, ids, teacher, "embedding_bag")
        dim = self.config.embedding_dim
        if dim is None:
            tv = _teacher_vocab(teacher) if self.config.init == "teacher" else None
            dim = tv[1] if tv is not None else 64
        architecture = {"family": "embedding_bag", "vocab_size": vocab, "embedding_dim": int(dim),
                        "hidden": list(self.config.hidden), "out_features": int(out_dim),
                        "seq_len": int(ids.row_shape[0]), "attention_mask": mask is not None}
        return _finish(build_embedding_bag(architecture), architecture, self.config.init, teacher)


def build_embedding_bag(architecture: Mapping[str, Any]) -> EmbeddingBagNet:
    return EmbeddingBagNet(int(architecture["vocab_size"]), int(architecture.get("embedding_dim", 64)),
                           [int(h) for h in architecture.get("hidden", [])], int(architecture["out_features"]))


# ---- text_transformer ----------------------------------------------------------------------------


class TextTransformer(nn.Module):
    """Token + learned position embeddings -> TransformerEncoder (post-norm, ReLU, no dropout)
    with key padding from the mask -> masked mean pool -> linear head."""

    def __init__(self, vocab_size: int, d_model: int, layers: int, heads: int, ff: int, max_len: int,
                 out_features: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, out_features)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.embedding(input_ids) + self.position(positions).unsqueeze(0)
        if attention_mask is None:
            return self.head(self.encoder(h).mean(dim=1))
        valid = attention_mask != 0
        # A row with no valid token would make every attention score -inf (NaN): attend to all instead.
        valid = valid | ~valid.any(dim=1, keepdim=True)
        h = self.encoder(h, src_key_padding_mask=~valid)
        return self.head(_masked_mean(h, valid))


@students.register("text_transformer")
class TextTransformerStudent:
    """A small Transformer encoder over token ids with an attention mask; mean-pooled output head."""

    Config = jobspec.TextTransformerStudent

    def __init__(self, config: Config):
        self.config = config

    def create(self, inputs: Any, out_dim: int, teacher: Any = None) -> tuple[nn.Module, dict[str, Any]]:
        ids, mask = _token_inputs(normalize_inputs(inputs), "text_transformer")
        vocab = _resolve_vocab(self.config.vocab_size, ids, teacher, "text_transformer")
        seq_len = int(ids.row_shape[0])
        max_len = int(self.config.max_len or seq_len)
        if max_len < seq_len:
            raise ShapeMismatch(f"student.max_len is {max_len} but the sequences have length {seq_len}")
        c = self.config
        architecture = {"family": "text_transformer", "vocab_size": vocab, "d_model": c.d_model, "layers": c.layers,
                        "heads": c.heads, "ff": c.ff, "max_len": max_len, "out_features": int(out_dim),
                        "seq_len": seq_len, "attention_mask": mask is not None}
        return _finish(build_text_transformer(architecture), architecture, c.init, teacher)


def build_text_transformer(architecture: Mapping[str, Any]) -> TextTransformer:
    a = architecture
    return TextTransformer(int(a["vocab_size"]), int(a.get("d_model", 64)), int(a.get("layers", 2)),
                           int(a.get("heads", 4)), int(a.get("ff", 128)), int(a.get("max_len", 512)),
                           int(a["out_features"]))


# ---- sequential (derived chains) -----------------------------------------------------------------


def build_sequential(architecture: Mapping[str, Any]) -> nn.Sequential:
    """A chain from ``{"family": "sequential", "layers": [...]}``; layer dicts by ``type``:

    ``linear`` (in, out, bias), ``conv2d`` (in, out, kernel_size, stride, padding, dilation, groups, bias),
    ``batchnorm1d``/``batchnorm2d`` (num_features, eps, momentum, affine), ``relu``, ``gelu``, ``tanh``,
    ``sigmoid``, ``leakyrelu`` (negative_slope), ``elu``, ``silu``, ``softplus``, ``identity``, ``flatten``
    (start_dim, end_dim), ``float_flatten``, ``unflatten`` (dim, sizes), ``dropout`` (p), ``maxpool2d`` /
    ``avgpool2d`` (kernel_size, stride, padding), ``adaptiveavgpool2d`` (output_size).
    """
    return nn.Sequential(*[_layer_from_dict(d) for d in architecture["layers"]])


_SIMPLE = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "elu": nn.ELU,
           "silu": nn.SiLU, "softplus": nn.Softplus, "identity": nn.Identity}


def _pair(v: Any) -> Any:
    return tuple(v) if isinstance(v, (list, tuple)) else v


def _layer_from_dict(d: Mapping[str, Any]) -> nn.Module:
    t = d.get("type")
    if t == "linear":
        return nn.Linear(int(d["in"]), int(d["out"]), bias=bool(d.get("bias", True)))
    if t == "conv2d":
        return nn.Conv2d(int(d["in"]), int(d["out"]), _pair(d["kernel_size"]), stride=_pair(d.get("stride", 1)),
                         padding=_pair(d.get("padding", 0)), dilation=_pair(d.get("dilation", 1)),
                         groups=int(d.get("groups", 1)), bias=bool(d.get("bias", True)))
    if t in ("batchnorm1d", "batchnorm2d"):
        cls = nn.BatchNorm1d if t == "batchnorm1d" else nn.BatchNorm2d
        return cls(int(d["num_features"]), eps=float(d.get("eps", 1e-5)), momentum=d.get("momentum", 0.1),
                   affine=bool(d.get("affine", True)))
    if t in _SIMPLE:
        return _SIMPLE[t]()
    if t == "leakyrelu":
        return nn.LeakyReLU(float(d.get("negative_slope", 0.01)))
    if t == "flatten":
        return nn.Flatten(int(d.get("start_dim", 1)), int(d.get("end_dim", -1)))
    if t == "float_flatten":
        return FloatFlatten(int(d.get("start_dim", 1)), int(d.get("end_dim", -1)))
    if t == "unflatten":
        return nn.Unflatten(int(d["dim"]), tuple(int(s) for s in d["sizes"]))
    if t == "dropout":
        return nn.Dropout(float(d.get("p", 0.5)))
    if t in ("maxpool2d", "avgpool2d"):
        cls = nn.MaxPool2d if t == "maxpool2d" else nn.AvgPool2d
        return cls(_pair(d["kernel_size"]), stride=_pair(d.get("stride")), padding=_pair(d.get("padding", 0)))
    if t == "adaptiveavgpool2d":
        return nn.AdaptiveAvgPool2d(_pair(d["output_size"]))
    raise Unsupported(f"unknown layer type {t!r} in a sequential architecture")


# ---- input reduction -----------------------------------------------------------------------------


class ReducedInput(nn.Module):
    """A student behind a fixed (non-trainable) first layer: flatten -> Linear(in, k) -> student.

    The Linear holds a PCA projection (centering folded into its bias) or a 0/1 selection matrix
    (select_k_best), so the model takes the ORIGINAL features while the student sees k.
    """

    def __init__(self, in_features: int, components: int, student: nn.Module):
        super().__init__()
        self.flatten = FloatFlatten()
        self.reduce = nn.Linear(in_features, components)
        self.reduce.requires_grad_(False)
        self.student = student

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(self.reduce(self.flatten(x)))


def build_input_reduction(architecture: Mapping[str, Any]) -> ReducedInput:
    """``{"family": "input_reduction", "in_features", "components", "student": {...}}``."""
    return ReducedInput(int(architecture["in_features"]), int(architecture["components"]),
                        from_architecture(architecture["student"]))


# ---- rebuild -------------------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {
    "mlp": build_mlp,
    "cnn": build_cnn,
    "resnet": build_resnet,
    "embedding_bag": build_embedding_bag,
    "text_transformer": build_text_transformer,
    "sequential": build_sequential,
    "input_reduction": build_input_reduction,
}


def from_architecture(architecture: Mapping[str, Any]) -> nn.Module:
    """Rebuild an (untrained) model from its architecture dict (defaults fill optional keys)."""
    family = architecture.get("family") if isinstance(architecture, Mapping) else None
    if family not in _BUILDERS:
        raise Unsupported(f"cannot rebuild model family {family!r}; known: {', '.join(_BUILDERS)}")
    try:
        return _BUILDERS[family](architecture)
    except KeyError as exc:
        raise InvalidModel(f"{family} architecture is missing the key {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise InvalidModel(f"{family} architecture is invalid: {exc}") from None


# ---- init: teacher -------------------------------------------------------------------------------

_KINDS = {"Linear": "linear", "Conv2d": "conv", "Conv1d": "conv", "BatchNorm1d": "bn", "BatchNorm2d": "bn",
          "Embedding": "embedding", "TransformerEncoderLayer": "encoder_layer",
          "MultiheadAttention": "attention", "LayerNorm": "norm"}


def _is_position(name: str) -> bool:
    return "pos" in name.lower().rsplit(".", 1)[-1] or "position" in name.lower()


def _plain_kind(module: nn.Module) -> str | None:
    """Role of a parameter-only leaf module (torch.export flattens modules to plain ``Module``)."""
    if any(True for _ in module.children()):
        return None
    params = dict(module.named_parameters(recurse=False))
    buffers = dict(module.named_buffers(recurse=False))
    w = params.get("weight")
    if w is None:
        return None
    if "running_mean" in buffers:
        return "bn"
    if w.dim() == 4 or w.dim() == 3:
        return "conv"
    if w.dim() == 2:
        return "linear" if "bias" in params else None
    return None


def _units(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """Ordered (name, kind, module) of the modules weights can be copied between."""
    out: list[tuple[str, str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            kind = _KINDS.get(_type_name(child)) or (_plain_kind(child) if _type_name(child) == "Module" else None)
            if kind in ("attention", "norm"):
                continue
            if kind is not None:
                out.append((full, kind, child))
            else:
                walk(full + ".", child)

    walk("", model)
    return out


def _align(k: int, n: int, keep_ends: bool) -> list[tuple[int, int]]:
    """Pairs (student i, teacher j): identity when k == n; first/last kept and the middle by stride
    (``keep_ends``), else i <- i·(n // k) (DistilBERT: student layer i <- teacher layer 2i)."""
    if k == 0 or n == 0:
        return []
    if k == n:
        return [(i, i) for i in range(k)]
    if not keep_ends:
        stride = max(1, n // k)
        return [(i, i * stride) for i in range(k) if i * stride < n]
    pairs = [(0, 0)]
    if k >= 2:
        pairs.append((k - 1, n - 1))
    mid_s, mid_t = k - 2, n - 2
    if mid_s > 0 and mid_t > 0:
        stride = max(1, mid_t // mid_s)
        pairs += [(1 + i, 1 + i * stride) for i in range(mid_s) if i * stride < mid_t]
    return sorted(pairs)


def _copy_state(dst: nn.Module, src: nn.Module, prefix: str) -> list[str]:
    """Copy every tensor of ``src``'s state into ``dst`` when all names and shapes agree; else nothing."""
    d_state, s_state = dst.state_dict(), dict(src.state_dict())
    if set(d_state) != set(s_state) or any(tuple(d_state[k].shape) != tuple(s_state[k].shape) for k in d_state):
        return []
    with torch.no_grad():
        for k, v in d_state.items():
            v.copy_(s_state[k].to(v.dtype))
    return [f"{prefix}.{k}" for k in d_state]


def project_embedding(table: torch.Tensor, dim: int) -> torch.Tensor:
    """[V, D] -> [V, dim] (dim < D): the table in the basis of its top-``dim`` right singular vectors
    (uncentred PCA), which keeps the most of the rows' energy and their inner products."""
    table = table.detach().to(torch.float64)
    _, _, vh = torch.linalg.svd(table, full_matrices=False)
    return (table @ vh[:dim].T).to(torch.float32)


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Copy teacher weights into ``student`` where shape and role match; returns the copied state keys.

    * token embedding: the teacher's ``nn.Embedding`` with the same vocabulary; a wider table is
      projected to the student's width with :func:`project_embedding`; position tables share the
      first ``max_len`` rows when widths match;
    * Transformer encoder layers: student layer i <- teacher layer i·(n // k) (every other layer when
      the student has half the depth, the DistilBERT recipe), whole layers whose shapes all match;
    * Linear / Conv layers (outside encoder layers), in order: first <- first, last <- last, middle
      layers by stride; a BatchNorm that follows a copied layer in both models is copied with it.
    """
    s_units, t_units = _units(student), _units(teacher)
    copied: list[str] = []

    def by_kind(units, kinds):
        return [(n, m) for n, k, m in units if k in kinds]

    # embeddings
    s_emb = [(n, m) for n, m in by_kind(s_units, {"embedding"})]
    t_emb = [(n, m) for n, m in by_kind(t_units, {"embedding"})]
    t_tokens = [(n, m) for n, m in t_emb if not _is_position(n)]
    t_pos = [(n, m) for n, m in t_emb if _is_position(n)]
    with torch.no_grad():
        for name, m in s_emb:
            w = m.weight
            if _is_position(name):
                for _, tm in t_pos:
                    tw = tm.weight
                    if tw.shape[1] == w.shape[1]:
                        rows = min(w.shape[0], tw.shape[0])
                        w[:rows].copy_(tw[:rows].to(w.dtype))
                        copied.append(f"{name}.weight")
                        break
                continue
            for _, tm in t_tokens:
                tw = tm.weight
                if tw.shape[0] != w.shape[0]:
                    continue
                if tw.shape[1] == w.shape[1]:
                    w.copy_(tw.to(w.dtype))
                elif tw.shape[1] > w.shape[1]:
                    w.copy_(project_embedding(tw, w.shape[1]).to(w.dtype))
                else:
                    continue
                copied.append(f"{name}.weight")
                break

    # transformer layers
    s_layers, t_layers = by_kind(s_units, {"encoder_layer"}), by_kind(t_units, {"encoder_layer"})
    for i, j in _align(len(s_layers), len(t_layers), keep_ends=False):
        copied += _copy_state(s_layers[i][1], t_layers[j][1], s_layers[i][0])

    # linear / conv chains, each with the BatchNorm that follows it
    def weighted(units):
        out = []
        for idx, (n, k, m) in enumerate(units):
            if k in ("linear", "conv"):
                bn = None
                if idx + 1 < len(units) and units[idx + 1][1] == "bn":
                    bn = units[idx + 1]
                out.append((n, k, m, bn))
        return out

    for kind in ("conv", "linear"):
        s_w = [u for u in weighted(s_units) if u[1] == kind]
        t_w = [u for u in weighted(t_units) if u[1] == kind]
        for i, j in _align(len(s_w), len(t_w), keep_ends=True):
            got = _copy_state(s_w[i][2], t_w[j][2], s_w[i][0])
            copied += got
            if got and s_w[i][3] is not None and t_w[j][3] is not None:
                copied += _copy_state(s_w[i][3][2], t_w[j][3][2], s_w[i][3][0])
    return copied


# ---- uploaded students ---------------------------------------------------------------------------


def load_uploaded(source: Any, load_module: Callable[[Path, str, Optional[dict]], nn.Module]
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """An uploaded trainable student (``student: {"model_id": ...}``).

    ``load_module(path, format, architecture)`` does the file I/O (the teacher loader); the module
    comes back in train mode with every floating-point parameter trainable. The architecture is
    ``{"family": "uploaded", "format": ...}``, or for safetensors the uploaded architecture itself
    (so the exported student can be rebuilt by :func:`from_architecture`).
    """
    fmt = str(source.format)
    arch_in = getattr(source, "architecture", None)
    module = load_module(Path(source.path), fmt, dict(arch_in) if arch_in is not None else None)
    if not isinstance(module, nn.Module):
        raise InvalidModel(f"the uploaded {fmt} student is not a trainable PyTorch module")
    module.train()
    trainable = 0
    for p in module.parameters():
        if p.dtype.is_floating_point:
            p.requires_grad_(True)
            trainable += p.numel()
    if trainable == 0:
        raise InvalidModel(f"the uploaded {fmt} student has no trainable floating-point parameters")
    if fmt == "safetensors" and arch_in is not None and arch_in.get("family") in _BUILDERS:
        architecture = {**dict(arch_in), "source": "uploaded"}
    else:
        architecture = {"family": "uploaded", "format": fmt}
    return module, architecture


def num_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def state_dict_bytes(model: nn.Module) -> int:
    """Raw tensor bytes of the state dict (fallback size when nothing is exported)."""
    return int(sum(t.numel() * t.element_size() for t in model.state_dict().values() if torch.is_tensor(t)))
