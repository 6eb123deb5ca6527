"""Data-free distillation: synthesise a transfer set with a generator trained against the teacher.

DAFL (H. Chen, Y. Wang, C. Xu, Z. Yang, C. Liu, B. Shi, C. Xu, C. Xu, Q. Tian, "Data-Free Learning of
Student Networks", ICCV 2019). A generator
G(z), z ~ N(0, I), is trained against the FROZEN teacher T to minimise

    L = L_oh + ACTIVATION_WEIGHT · L_a + ENTROPY_WEIGHT · L_ie

* L_oh  = CE(T(G(z)), argmax T(G(z)))           - samples the teacher classifies confidently
* L_a   = −mean |f|, f = the teacher's penultimate features (input of its last Linear, via a
          forward pre-hook; TorchScript chains are rebuilt eagerly to hook them; the term is
          skipped when no last Linear is found)
* L_ie  = −H(mean_batch softmax(T(G(z))))      - all classes equally often (class balance)

Generator outputs are squashed into ``value_range`` with a sigmoid. After training,
``num_samples`` rows are drawn with fresh latents. Everything random comes from the caller's
``torch.Generator``, so the result is deterministic for a given seed (on one device).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import Cancelled, EngineError, InvalidSpec, ShapeMismatch, Unsupported

ONE_HOT_WEIGHT = 1.0
ACTIVATION_WEIGHT = 0.1
ENTROPY_WEIGHT = 5.0
BATCH_SIZE = 256
MAX_ITERATIONS_PER_EPOCH = 50
LEARNING_RATE = 1e-3 * 5


class VectorGenerator(nn.Module):
    """z -> MLP (BatchNorm, LeakyReLU) -> prod(shape) -> sigmoid -> value range."""

    def __init__(self, latent_dim: int, shape: tuple[int, ...], low: float, high: float, hidden: int = 256):
        super().__init__()
        self.shape = shape
        self.low, self.high = low, high
        out = int(math.prod(shape))
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden * 2), nn.BatchNorm1d(hidden * 2), nn.LeakyReLU(0.2),
            nn.Linear(hidden * 2, out), nn.BatchNorm1d(out),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.sigmoid(self.net(z))
        return (self.low + (self.high - self.low) * x).reshape(z.shape[0], *self.shape)


class ImageGenerator(nn.Module):
    """DAFL's generator for C×H×W (H, W divisible by 4): linear -> 2× (upsample, conv, BN, LeakyReLU) -> conv."""

    def __init__(self, latent_dim: int, shape: tuple[int, int, int], low: float, high: float, width: int = 64):
        super().__init__()
        c, h, w = shape
        self.h0, self.w0, self.width = h // 4, w // 4, width * 2
        self.low, self.high = low, high
        self.fc = nn.Linear(latent_dim, self.width * self.h0 * self.w0)
        self.net = nn.Sequential(
            nn.BatchNorm2d(self.width), nn.Upsample(scale_factor=2),
            nn.Conv2d(self.width, self.width, 3, padding=1), nn.BatchNorm2d(self.width), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(self.width, width, 3, padding=1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2),
            nn.Conv2d(width, c, 3, padding=1), nn.BatchNorm2d(c),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).reshape(z.shape[0], self.width, self.h0, self.w0)
        return self.low + (self.high - self.low) * torch.sigmoid(self.net(x))


def make_generator(latent_dim: int, shape: tuple[int, ...], low: float, high: float) -> nn.Module:
    if len(shape) == 3 and shape[1] % 4 == 0 and shape[2] % 4 == 0 and min(shape[1:]) >= 8:
        return ImageGenerator(latent_dim, shape, low, high)  # type: ignore[arg-type]
    return VectorGenerator(latent_dim, shape, low, high)


def _last_linear(module: nn.Module) -> nn.Module | None:
    last = None
    for _, m in module.named_modules():
        if type(m).__name__ == "Linear" and not isinstance(m, torch.jit.ScriptModule):
            last = m
    return last


def _hookable(teacher: nn.Module) -> nn.Module:
    """The teacher itself, or for a TorchScript chain an eager copy (hooks do not fire in TorchScript)."""
    if isinstance(teacher, torch.jit.ScriptModule):
        from engine.students.derive import rebuild_chain

        try:
            return rebuild_chain(teacher)
        except EngineError:
            return teacher
    return teacher


def synthesize(
    teacher: nn.Module,
    input_shape: tuple[int, ...],
    value_range: tuple[float, float],
    num_classes: int,
    cfg: Mapping[str, Any],
    *,
    generator: torch.Generator,
    device: torch.device,
    should_stop: Callable[[], bool],
    on_epoch: Callable[[int, dict], None] | None = None,
) -> torch.Tensor:
    """Train a DAFL generator against ``teacher`` and return ``num_samples`` synthetic rows.

    ``cfg`` keys: ``method`` ("generator"), ``num_samples``, ``generator_epochs``, ``latent_dim``.
    ``on_epoch(epoch, {"loss", "one_hot", "activation", "entropy", "classes"})`` after each epoch
    (``classes``: distinct teacher predictions in the epoch's last batch). Returns float32
    [num_samples, *input_shape] within ``value_range``, on ``device``.
    """
    if not isinstance(teacher, nn.Module):
        raise Unsupported("data-free synthesis needs a PyTorch teacher (gradients flow through it)")
    method = cfg.get("method", "generator")
    if method != "generator":
        raise InvalidSpec(f"synthesize.method: unknown method {method!r}")
    num_samples = int(cfg.get("num_samples", 10_000))
    epochs = int(cfg.get("generator_epochs", 30))
    latent_dim = int(cfg.get("latent_dim", 64))
    low, high = float(value_range[0]), float(value_range[1])
    shape = tuple(int(d) for d in input_shape)
    if not low < high:
        raise InvalidSpec(f"input_spec.range must be [low, high] with low < high, got {value_range}")

    net = _hookable(teacher).to(device)
    was_training = net.training
    net.eval()
    flags = [(p, p.requires_grad) for p in net.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)

    features: list[torch.Tensor] = []
    last = _last_linear(net)
    handle = None
    if last is not None:
        handle = last.register_forward_pre_hook(lambda _m, inp: features.append(inp[0]))

    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = make_generator(latent_dim, shape, low, high).to(device)
    opt = torch.optim.Adam(gen.parameters(), lr=LEARNING_RATE)
    iters = max(1, min(MAX_ITERATIONS_PER_EPOCH, math.ceil(num_samples / BATCH_SIZE)))

    def latent(n: int) -> torch.Tensor:
        return torch.randn(n, latent_dim, generator=generator).to(device)

    try:
        gen.train()
        for epoch in range(epochs):
            totals = {"loss": 0.0, "one_hot": 0.0, "activation": 0.0, "entropy": 0.0}
            classes = 0
            for _ in range(iters):
                if should_stop():
                    raise Cancelled()
                features.clear()
                x = gen(latent(BATCH_SIZE))
                logits = net(x)
                if logits.dim() != 2 or logits.shape[1] != num_classes:
                    raise ShapeMismatch(f"the teacher returned {list(logits.shape)} on synthetic rows, "
                                                        f"expected [batch, {num_classes}]")
                pseudo = logits.argmax(dim=1)
                one_hot = F.cross_entropy(logits, pseudo)
                mean_p = F.softmax(logits, dim=1).mean(dim=0)
                entropy = -(mean_p * torch.log(mean_p + 1e-8)).sum()
                activation = -features[-1].abs().mean() if features else logits.new_zeros(())
                loss = ONE_HOT_WEIGHT * one_hot + ACTIVATION_WEIGHT * activation - ENTROPY_WEIGHT * entropy
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                totals["loss"] += float(loss.detach())
                totals["one_hot"] += float(one_hot.detach())
                totals["activation"] += float(activation.detach())
                totals["entropy"] += float(entropy.detach())
                classes = int(pseudo.unique().numel())
            if on_epoch is not None:
                on_epoch(epoch, {**{k: v / iters for k, v in totals.items()}, "classes": classes})

        # Draw the transfer set in training mode (the batch statistics the teacher was trained against).
        out = []
        with torch.no_grad():
            for start in range(0, num_samples, BATCH_SIZE):
                if should_stop():
                    raise Cancelled()
                n = min(BATCH_SIZE, num_samples - start)
                out.append(gen(latent(max(n, 2)))[:n])
        samples = torch.cat(out).to(torch.float32).clamp_(low, high)
    finally:
        if handle is not None:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        net.train(was_training)
    return samples
