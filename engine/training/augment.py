"""Training-time augmentation of a batch (``step.augment``), drawn from the job's seeded generator.

Flip and shift act on image inputs [N, C, H, W], noise on every float input, mixup mixes float rows;
integer inputs (token ids) pass through unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def augment_batch(xs: list[torch.Tensor], cfg: Any, gen: torch.Generator
                  ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, float] | None]:
    """Flip/shift (N×C×H×W float inputs), noise (float inputs), mixup (float inputs).

    Returns the augmented inputs and ``(perm, lam)`` when mixup mixed rows.
    """
    out = []
    b = xs[0].shape[0]
    for x in xs:
        if not x.is_floating_point():
            out.append(x)
            continue
        if x.dim() == 4:
            if cfg.flip:
                mask = (torch.rand(b, generator=gen) < 0.5).to(x.device)
                x = torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)
            if cfg.shift:
                s = int(cfg.shift)
                padded = F.pad(x, (s, s, s, s))
                dx = torch.randint(0, 2 * s + 1, (b,), generator=gen).tolist()
                dy = torch.randint(0, 2 * s + 1, (b,), generator=gen).tolist()
                h, w = x.shape[-2:]
                x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
        if cfg.noise:
            x = x + cfg.noise * torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
        out.append(x)
    mix = None
    if cfg.mixup and b > 1:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        lam = float(np.random.default_rng(seed).beta(cfg.mixup, cfg.mixup))
        perm = torch.randperm(b, generator=gen).to(xs[0].device)
        out = [lam * x + (1 - lam) * x[perm] if x.is_floating_point() else x for x in out]
        mix = (perm, lam)
    return out, mix
