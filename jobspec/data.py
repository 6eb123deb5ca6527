"""Where a step's transfer data comes from: the dataset, a coreset of it, synthesis, reduced inputs."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from jobspec.base import Config


class Synthesize(Config):
    """Data-free distillation: train a generator against the teacher and distill on its samples."""

    method: Literal["generator"] = "generator"
    num_samples: int = Field(10_000, ge=64, le=10_000_000)
    generator_epochs: int = Field(30, ge=1, le=10_000)
    latent_dim: int = Field(64, ge=2, le=4096)


class Coreset(Config):
    """Distill on a representative subset of the transfer set."""

    method: Literal["kmeans", "random"] = "kmeans"
    fraction: float = Field(0.25, gt=0, le=1)


class InputReduction(Config):
    """Fit PCA / univariate selection on the transfer set; fold it into the student as a fixed first layer."""

    method: Literal["pca", "select_k_best"] = "pca"
    components: int = Field(16, ge=1, le=100_000)


class InputSpec(Config):
    """Shape of one model input, for data-free jobs (no dataset to infer it from)."""

    shape: list[Annotated[int, Field(ge=1, le=1_000_000)]] = Field(min_length=1, max_length=6,
                                                                   description="Per-example shape, e.g. [64].")
    dtype: Literal["float32"] = "float32"
    range: tuple[float, float] = (0.0, 1.0)

    @model_validator(mode="after")
    def _ordered(self) -> InputSpec:
        if self.range[0] >= self.range[1]:
            raise ValueError("range must be [low, high] with low < high")
        return self
