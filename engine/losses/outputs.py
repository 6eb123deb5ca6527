"""Distillation losses (registry ``losses``, selected by ``loss.type``).

A loss instance is called as ``loss(student_out, teacher_out, labels)``:

* ``student_out``: float tensor [B, D] (logits, regression outputs or embeddings; requires grad)
* ``teacher_out``: float tensor [B, D] (cached, no grad)
* ``labels``: int64 [B] class ids, float [B] / [B, D] regression targets, or ``None``

and returns a scalar tensor (mean over the batch).

Each class's ``Config`` is the spec's model (:mod:`jobspec.losses`); which teacher tasks a loss applies to
is :func:`jobspec.rules.loss_tasks`.

Formulas (``p = softmax``, ``T`` the temperature, means over the batch):

==========  ==================================================================================
``kd``      α·T²·KL(p(t/T) ‖ p(s/T)) + (1−α)·CE(s, y); without labels T²·KL only
``soft_ce`` T²·CE(p(t/T), p(s/T)) + w·H(p(s)),  CE(q, p) = −Σ q log p,  H(p) = −Σ p log p
``hard``    CE(s, argmax t) with label smoothing ε (labels ignored)
``mse``     mean((s − t)²) over all elements; ``probabilities``: mean((p(s) − p(t))²)
``cosine``  mean(1 − cos(s, t)) + w·mean((s − t)²)
==========  ==================================================================================

References:

* ``kd``, ``soft_ce``: G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network",
  NIPS Deep Learning Workshop, 2015 (arXiv:1503.02531). The entropy term of ``soft_ce`` is entropy
  minimisation (Y. Grandvalet, Y. Bengio, "Semi-supervised Learning by Entropy Minimization", NIPS 2004);
  a negative weight is the confidence penalty (G. Pereyra et al., "Regularizing Neural Networks by
  Penalizing Confident Output Distributions", ICLR Workshop 2017).
* ``hard``: the teacher's argmax as pseudo-labels (D.-H. Lee, "Pseudo-Label", ICML Workshop 2013) with
  label smoothing (C. Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", CVPR 2016).
* ``mse``: logit / output matching (J. Ba, R. Caruana, "Do Deep Nets Really Need to be Deep?", NIPS 2014;
  T. Kim et al., "Comparing Kullback-Leibler Divergence and Mean Squared Error Loss in Knowledge
  Distillation", IJCAI 2021).
* ``cosine``: embedding distillation by direction, as DistilBERT's cosine loss on hidden states (V. Sanh et al.,
  "DistilBERT, a distilled version of BERT", NeurIPS EMC² Workshop 2019) and with the MSE term of
  N. Reimers, I. Gurevych, "Making Monolingual Sentence Embeddings Multilingual using Knowledge
  Distillation", EMNLP 2020.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

import jobspec
from engine.registry import losses



def _class_labels(labels: torch.Tensor | None) -> torch.Tensor | None:
    """Integer class labels, or None for unlabelled/regression targets."""
    if labels is None or labels.dtype.is_floating_point or labels.dim() != 1:
        return None
    return labels.long()


@losses.register("kd")
class KDLoss:
    """Knowledge distillation of Hinton, Vinyals & Dean (2015), shapes [B, C] logits.

    With labels:    alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(s, y)
    Without labels: T^2 * KL(p_t || p_s)  (alpha is ignored)

    where p_t = softmax(t / T), p_s = softmax(s / T). The T^2 factor keeps the
    soft-target gradients on the same scale as the hard-label ones as T grows.
    """

    Config = jobspec.KDLoss

    def __init__(self, config: Config):
        self.config = config

    def __call__(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        t = self.config.temperature
        # log_target=True keeps both sides in log space: no log(0) for confident
        # teachers. "batchmean" is the mathematically correct KL mean per row.
        soft = F.kl_div(
            F.log_softmax(student_logits / t, dim=-1),
            F.log_softmax(teacher_logits / t, dim=-1),
            log_target=True,
            reduction="batchmean",
        ) * (t * t)
        labels = _class_labels(labels)
        if labels is None:
            return soft
        alpha = self.config.alpha
        hard = F.cross_entropy(student_logits, labels)
        return alpha * soft + (1.0 - alpha) * hard


@losses.register("soft_ce")
class SoftCELoss:
    """Cross-entropy against the teacher's softened probabilities plus an entropy term (Grandvalet & Bengio 2004).

        L = T^2 * mean_i( -sum_c q_ic log p_ic )  +  w * mean_i( -sum_c r_ic log r_ic )

    with q = softmax(t / T), p = softmax(s / T) and r = softmax(s) (the student's
    *unsoftened* output, so w acts on the confidence of the deployed model). The soft
    term equals kd's (alpha = 1) plus the teacher entropy T^2·H(q), a constant, so the
    gradients and the T^2 scaling are the same as kd's. w > 0 rewards confident
    (low-entropy) students, w < 0 penalises overconfidence. Labels are not used.
    """

    Config = jobspec.SoftCELoss

    def __init__(self, config: Config):
        self.config = config

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 labels: torch.Tensor | None) -> torch.Tensor:
        t = self.config.temperature
        q = F.softmax(teacher_logits / t, dim=-1)
        ce = -(q * F.log_softmax(student_logits / t, dim=-1)).sum(dim=-1).mean() * (t * t)
        w = self.config.entropy_weight
        if w == 0.0:
            return ce
        log_r = F.log_softmax(student_logits, dim=-1)
        entropy = -(log_r.exp() * log_r).sum(dim=-1).mean()
        return ce + w * entropy


@losses.register("hard")
class HardLoss:
    """Cross-entropy against the teacher's argmax (hard pseudo-labels; Lee 2013).

        L = CE_ε(s, argmax_c t_c)

    with PyTorch's label smoothing ε: the target is (1−ε)·onehot + ε/C. Dataset labels
    are ignored (the point is to learn the teacher's decisions), so it works unlabelled.
    """

    Config = jobspec.HardLoss

    def __init__(self, config: Config):
        self.config = config

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 labels: torch.Tensor | None) -> torch.Tensor:
        return F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1),
                               label_smoothing=self.config.label_smoothing)


@losses.register("mse")
class MSELoss:
    """Mean squared error between student and teacher (regression / logit matching; Ba & Caruana 2014).

    ``target: outputs``:       mean over all B·D elements of (s − t)²
    ``target: probabilities``: mean over all B·C elements of (softmax(s) − softmax(t))²
    (classification only).

    Dataset labels (regression targets included) are not used: the student imitates the
    teacher's predictions, as in the source.
    """

    Config = jobspec.MSELoss

    def __init__(self, config: Config):
        self.config = config

    def __call__(self, student_out: torch.Tensor, teacher_out: torch.Tensor,
                 labels: torch.Tensor | None) -> torch.Tensor:
        if self.config.target == "probabilities":
            return F.mse_loss(F.softmax(student_out, dim=-1), F.softmax(teacher_out, dim=-1))
        return F.mse_loss(student_out, teacher_out.to(student_out.dtype).reshape(student_out.shape))


@losses.register("cosine")
class CosineLoss:
    """Cosine distance between student and teacher rows, for embedding models.

        L = mean_i(1 − cos(s_i, t_i)) + w · mean((s − t)²)

    cos uses ``F.cosine_similarity`` (eps 1e-8 on the norms). The MSE term (w > 0) also
    pins the scale, which the cosine alone leaves free. Labels are not used.
    """

    Config = jobspec.CosineLoss

    def __init__(self, config: Config):
        self.config = config

    def __call__(self, student_out: torch.Tensor, teacher_out: torch.Tensor,
                 labels: torch.Tensor | None) -> torch.Tensor:
        s = student_out.reshape(student_out.shape[0], -1)
        t = teacher_out.reshape(teacher_out.shape[0], -1).to(s.dtype)
        loss = (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()
        if self.config.mse_weight:
            loss = loss + self.config.mse_weight * F.mse_loss(s, t)
        return loss
