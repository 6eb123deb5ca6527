"""Student model families (registry ``students``, selected by ``student.family``).

A family instance turns its config plus the data/teacher dimensions into a fresh model::

    family.create(inputs: list[InputInfo], out_dim: int, teacher: TeacherInfo | None = None)
        -> (nn.Module, architecture: dict)

* the model's ``forward`` takes one positional tensor per entry of ``inputs``, in that order,
  and returns [B, out_dim]. Float families (``mlp``, ``cnn``, ``resnet``) take one input;
  token families (``embedding_bag``, ``text_transformer``) take ``input_ids`` [B, L] int64 and
  optionally ``attention_mask`` [B, L] (second input; 0 = padding).
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

Next to this module: :mod:`.architecture` (``from_architecture``, derived chains, input reduction),
:mod:`.teacher_init` (the ``init: teacher`` weight copy), :mod:`.derive` (shrink the teacher),
:mod:`.uploaded` (a trainable uploaded student), :mod:`.builder` (the spec's student → its builder),
:mod:`.common` (input checks, parameter counts).

References: ``resnet`` — K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016; ``text_transformer`` — A. Vaswani et al., "Attention Is All You Need", NeurIPS 2017;
``embedding_bag`` — A. Joulin, E. Grave, P. Bojanowski, T. Mikolov, "Bag of Tricks for Efficient Text
Classification", EACL 2017.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

import jobspec
from engine.registry import students
from engine.errors import ShapeMismatch, Unsupported
from engine.students.common import (
    _ACTIVATIONS,
    _image_shape,
    _single_float_input,
    _token_inputs,
    normalize_inputs,
)
from engine.students.teacher_init import (
    _resolve_vocab,
    _teacher_module,
    _teacher_vocab,
    init_bag_from_outputs,
    init_from_teacher,
    token_output_table,
)


def _init_module(teacher: Any) -> nn.Module:
    module = _teacher_module(teacher)
    if module is None:
        raise Unsupported("student.init 'teacher' needs a PyTorch teacher (TorchScript, torch.export or safetensors), "
            "not an ONNX graph",
        )
    return module


def _finish(model: nn.Module, architecture: dict[str, Any], init: str, teacher: Any) -> tuple[nn.Module, dict]:
    if init == "teacher":
        architecture["init_from_teacher"] = init_from_teacher(model, _init_module(teacher))
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
        model = build_embedding_bag(architecture)
        if self.config.init == "teacher" and getattr(teacher, "task", None) == "embedding":
            # Copying an encoder's raw token table (and whichever of its Linears fits the head) gives a bag
            # student the table's input end only: a transformer teacher reads it through LayerNorm, attention
            # and FFN layers, so the copy starts near cosine 0 and the head often receives an attention
            # projection. The teacher's embedding of each token alone, averaged, is already the best bag
            # approximation to hand (a 2-layer encoder: held-out cosine 0.66 before training where the copy
            # gives ~0; 0.83 vs 0.80 after 10 epochs in tests/engine/test_embedding_students.py).
            table = token_output_table(_init_module(teacher), [ids] + ([mask] if mask is not None else []),
                                       vocab, int(out_dim))
            if table is not None:
                architecture["init_from_teacher"] = init_bag_from_outputs(model.embedding, model.head, table)
                return model, architecture
        return _finish(model, architecture, self.config.init, teacher)


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


