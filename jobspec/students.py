"""Student configs: a built-in family (``family``), an uploaded model (``model_id``), or the teacher shrunk
(``derive``). Input and output sizes come from the data and the teacher, never from the spec."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from jobspec.base import Config, union

Init = Literal["random", "teacher"]
_INIT = Field("random", description="'teacher' copies teacher weights where shape and role match.")
Width = Annotated[int, Field(ge=1, le=65536)]


class MLPStudent(Config):
    """Fully connected student. Input and output widths are inferred from the data and the teacher."""

    family: Literal["mlp"] = "mlp"
    hidden: list[Width] = Field(default_factory=lambda: [128], max_length=32)
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    dropout: float = Field(0.0, ge=0, lt=1)
    init: Init = _INIT


class CNNStudent(Config):
    """Conv blocks (conv → batch norm → ReLU → 2×2 max-pool) then a linear head; inputs N×C×H×W."""

    family: Literal["cnn"] = "cnn"
    channels: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default_factory=lambda: [16, 32], min_length=1,
                                                                  max_length=8)
    kernel_size: int = Field(3, ge=1, le=11)
    hidden: list[Width] = Field(default_factory=list, max_length=4)
    dropout: float = Field(0.0, ge=0, lt=1)
    init: Init = _INIT


class ResNetStudent(Config):
    """A small residual network: a stem, ``depth`` basic blocks in 3 stages of ``width``·(1, 2, 4) channels."""

    family: Literal["resnet"] = "resnet"
    depth: int = Field(6, ge=1, le=64, description="Residual blocks in total.")
    width: int = Field(16, ge=1, le=1024)
    init: Init = _INIT


class EmbeddingBagStudent(Config):
    """Mean of token embeddings (mask-aware) → MLP head; for token-id inputs (input_ids [+ attention_mask])."""

    family: Literal["embedding_bag"] = "embedding_bag"
    embedding_dim: int | None = Field(None, ge=1, le=8192, description="Default: the teacher's, when init is teacher.")
    hidden: list[Width] = Field(default_factory=list, max_length=8)
    vocab_size: int | None = Field(None, ge=2, le=10_000_000, description="Default: inferred from teacher/data.")
    init: Init = _INIT


class TextTransformerStudent(Config):
    """A small Transformer encoder over token ids with an attention mask; mean-pooled output head."""

    family: Literal["text_transformer"] = "text_transformer"
    d_model: int = Field(64, ge=8, le=4096)
    layers: int = Field(2, ge=1, le=48)
    heads: int = Field(4, ge=1, le=64)
    ff: int = Field(128, ge=8, le=16384)
    vocab_size: int | None = Field(None, ge=2, le=10_000_000)
    max_len: int | None = Field(None, ge=1, le=65536)
    init: Init = _INIT

    @model_validator(mode="after")
    def _heads_divide(self) -> TextTransformerStudent:
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        return self


#: The portable names of an ``hf_causal_lm`` student's size (mapped to each architecture's own config keys).
HF_SIZE_KEYS = ("layers", "hidden_size", "heads", "kv_heads", "intermediate_size", "context_length")


class HFCausalLMStudent(Config):
    """A fresh (randomly initialised) causal LM of the teacher's Hugging Face architecture and tokenizer, sized
    by ``config`` (the teacher's value for every key not given), e.g. ``{"layers": 4, "hidden_size": 256}``."""

    family: Literal["hf_causal_lm"] = "hf_causal_lm"
    config: dict[Literal["layers", "hidden_size", "heads", "kv_heads", "intermediate_size", "context_length"],
                 Annotated[int, Field(ge=1, le=1_000_000)]] = Field(default_factory=dict)


STUDENT_FAMILIES: dict[str, type[Config]] = {"mlp": MLPStudent, "cnn": CNNStudent, "resnet": ResNetStudent,
                                             "embedding_bag": EmbeddingBagStudent,
                                             "text_transformer": TextTransformerStudent,
                                             "hf_causal_lm": HFCausalLMStudent}
FamilyStudent = union(STUDENT_FAMILIES, "family")


class UploadedStudent(Config):
    """A trainable model uploaded to /v1/models (TorchScript, torch.export or safetensors + architecture)."""

    model_id: str = Field(min_length=1, max_length=40)


class DeriveRatios(Config):
    width: float = Field(0.5, gt=0, le=1, description="Hidden widths / channels are multiplied by this "
                                                      "(causal_lm: the MLP's intermediate units; default 1.0).")
    depth: float = Field(1.0, gt=0, le=1, description="Hidden layers / blocks kept (every other when 0.5).")


class DerivedStudent(Config):
    """Shrink the teacher's own architecture (built-in family, or a plain Linear/Conv/activation chain)."""

    derive: DeriveRatios
    init: Init = _INIT


Student = Union[FamilyStudent, UploadedStudent, DerivedStudent]
STUDENT_SOURCES = ("family", "model_id", "derive")
