"""Knowledge-distillation losses (the eight of the Voice2Mesh KD ablation).

The formulas follow the reference formulations with their usual default weights (FACTS §6):

======  ==========================================================  ==============
name    loss                                                        default weight
======  ==========================================================  ==============
kd      KL(softmax(t/T) || softmax(s/T)) * T^2, T = 4               1
at      attention transfer, mean squared difference of maps         1000
sp      similarity preserving, batch Gram matrices                  3000
cc      correlation congruence on 128-d embeddings                  0.02
rkd     relational KD, distance (25) + angle (50)                   1
pkt     probabilistic knowledge transfer (cosine kernel)            30000
vid     variational information distillation                        1
crd     contrastive representation distillation (NCE, memory bank)  0.8
======  ==========================================================  ==============

Calling convention
------------------
Every loss is an ``nn.Module`` called as ``loss(student_out, teacher_out, index=None)`` and
returns a scalar tensor that already includes its weight. ``student_out`` and ``teacher_out``
are dicts as returned by ``MobileNetV2.forward(x, return_features=True)``:

``logits`` or ``params`` : (B, P)
    Network outputs (KD uses ``logits`` when present, else ``params``).
``features`` : (B, D)
    The pooled feature vector.
``early`` : (B, C, H, W)
    An early feature map (flattened where a loss needs a vector).
``maps`` : list of (B, C_i, H_i, W_i)
    Spatial feature maps, for AT and VID.

``index`` (B,) are the dataset indices of the samples, needed by CRD only. Teacher entries are
detached inside every loss. Losses with learnable parts (CC and CRD embeddings, the VID
regressor and variances) are modules whose ``parameters()`` must be given to the optimiser.

The math is also available as pure functions on tensors (``kd_kl``, ``attention_map``,
``at_distance``, ``sp_distance``, ``cc_distance``, ``rkd_distance_loss``, ``rkd_angle_loss``,
``pkt_distance``, ``nce_loss``). :func:`make_kd_loss` builds a loss by name.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from v2m_bench.errors import ValidationError

__all__ = [
    "KD_NAMES",
    "DEFAULT_WEIGHTS",
    "kd_kl",
    "attention_map",
    "at_distance",
    "sp_distance",
    "cc_distance",
    "pairwise_distances",
    "rkd_distance_loss",
    "rkd_angle_loss",
    "pkt_distance",
    "nce_loss",
    "KDLoss",
    "ATLoss",
    "SPLoss",
    "CCLoss",
    "RKDLoss",
    "PKTLoss",
    "VIDLoss",
    "CRDLoss",
    "make_kd_loss",
]

#: Names accepted by :func:`make_kd_loss`.
KD_NAMES: tuple[str, ...] = ("pkt", "kd", "at", "sp", "cc", "rkd", "crd", "vid")

#: Default weights (RepDistiller defaults; RKD carries its weights inside: distance 25, angle 50).
DEFAULT_WEIGHTS: Mapping[str, float] = MappingProxyType({
    "kd": 1.0,
    "at": 1000.0,
    "sp": 3000.0,
    "cc": 0.02,
    "rkd": 1.0,
    "pkt": 30000.0,
    "vid": 1.0,
    "crd": 0.8,
})


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def kd_kl(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton distillation: KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch.

    Parameters
    ----------
    s_logits, t_logits : torch.Tensor, shape (B, K)
    temperature : float

    Returns
    -------
    torch.Tensor, scalar
    """
    log_p_s = F.log_softmax(s_logits / temperature, dim=1)
    log_p_t = F.log_softmax(t_logits / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    return kl.mean() * temperature**2


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention map: mean over channels of ``|f|^p``, flattened and L2-normalised.

    Parameters
    ----------
    f : torch.Tensor, shape (B, C, H, W)
    p : float

    Returns
    -------
    torch.Tensor, shape (B, H*W)
    """
    a = f.abs().pow(p).mean(dim=1) if p != 2 else f.pow(2).mean(dim=1)
    return F.normalize(a.flatten(1), dim=1)


def at_distance(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention-transfer distance of one pair of maps: mean squared difference of attention maps.

    When the spatial sizes differ, the larger map's attention is average-pooled to the smaller
    size before normalisation.

    Parameters
    ----------
    f_s : torch.Tensor, shape (B, C_s, H_s, W_s)
    f_t : torch.Tensor, shape (B, C_t, H_t, W_t)

    Returns
    -------
    torch.Tensor, scalar
    """
    if f_s.shape[2:] != f_t.shape[2:]:
        size = (min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3]))
        a_s = F.adaptive_avg_pool2d(f_s.abs().pow(p).mean(1, keepdim=True), size)
        a_t = F.adaptive_avg_pool2d(f_t.abs().pow(p).mean(1, keepdim=True), size)
        a_s, a_t = F.normalize(a_s.flatten(1), dim=1), F.normalize(a_t.flatten(1), dim=1)
    else:
        a_s, a_t = attention_map(f_s, p), attention_map(f_t, p)
    return (a_s - a_t).pow(2).mean()


def sp_distance(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving distance ``||G_t - G_s||_F^2 / B^2``.

    ``G = F F^T`` is the batch Gram matrix of the flattened features, each row L2-normalised.

    Parameters
    ----------
    f_s : torch.Tensor, shape (B, ...)
    f_t : torch.Tensor, shape (B, ...)

    Returns
    -------
    torch.Tensor, scalar
    """
    b = f_s.shape[0]
    fs, ft = f_s.reshape(b, -1), f_t.reshape(b, -1)
    g_s = F.normalize(fs @ fs.t(), dim=1)
    g_t = F.normalize(ft @ ft.t(), dim=1)
    return (g_t - g_s).pow(2).sum() / (b * b)


def cc_distance(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    """Correlation congruence on consecutive samples.

    With ``d = |e_s - e_t|`` (per sample), the loss is the batch mean of
    ``<d_i, d_{i+1}>`` over consecutive pairs: zero when the embeddings agree.

    Parameters
    ----------
    e_s, e_t : torch.Tensor, shape (B, D)
        Embeddings of the same size, B >= 2.

    Returns
    -------
    torch.Tensor, scalar
    """
    d = (e_s - e_t).abs()
    return (d[:-1] * d[1:]).sum(dim=1).mean()


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distance matrix with a zero diagonal (gradient-safe at zero).

    Parameters
    ----------
    e : torch.Tensor, shape (B, D)

    Returns
    -------
    torch.Tensor, shape (B, B)
    """
    sq = e.pow(2).sum(dim=1)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (e @ e.t())).clamp(min=eps)
    d = d2.sqrt()
    return d * (1.0 - torch.eye(e.shape[0], device=e.device, dtype=e.dtype))


def rkd_distance_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """RKD distance term: smooth-L1 between pairwise distances, each set divided by its mean.

    Parameters
    ----------
    f_s : torch.Tensor, shape (B, D_s)
    f_t : torch.Tensor, shape (B, D_t)

    Returns
    -------
    torch.Tensor, scalar
    """
    d_t = pairwise_distances(f_t)
    d_t = d_t / d_t[d_t > 0].mean()
    d_s = pairwise_distances(f_s)
    d_s = d_s / d_s[d_s > 0].mean()
    return F.smooth_l1_loss(d_s, d_t)


def rkd_angle_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """RKD angle term: smooth-L1 between the cosines of the angles e_i - e_j, e_k - e_j.

    Parameters
    ----------
    f_s : torch.Tensor, shape (B, D_s)
    f_t : torch.Tensor, shape (B, D_t)

    Returns
    -------
    torch.Tensor, scalar
    """

    def cosines(e: torch.Tensor) -> torch.Tensor:
        diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)  # (B, B, D): e_j - e_i
        return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)

    return F.smooth_l1_loss(cosines(f_s), cosines(f_t))


def pkt_distance(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer with the cosine kernel.

    Rows are L2-normalised, ``S = F F^T`` (cosine similarities), ``P = (S + 1) / 2`` and each
    row of ``P`` is divided by its sum; the loss is the mean over all (i, j) of
    ``P_t log((P_t + eps) / (P_s + eps))``.

    Parameters
    ----------
    f_s : torch.Tensor, shape (B, ...)
    f_t : torch.Tensor, shape (B, ...)
        Flattened per sample; feature sizes may differ.

    Returns
    -------
    torch.Tensor, scalar
    """

    def probs(f: torch.Tensor) -> torch.Tensor:
        f = f.reshape(f.shape[0], -1)
        f = f / (f.norm(dim=1, keepdim=True) + eps)
        p = (f @ f.t() + 1.0) / 2.0
        return p / p.sum(dim=1, keepdim=True)

    p_s, p_t = probs(f_s), probs(f_t)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def nce_loss(scores: torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    """NCE loss of CRD: column 0 holds the positive's score, the other K columns negatives'.

    With noise probability ``Pn = 1 / n_data`` and ``m = K``:
    ``-(sum log(P_pos / (P_pos + m Pn)) + sum log(m Pn / (P_neg + m Pn))) / B``.

    Parameters
    ----------
    scores : torch.Tensor, shape (B, K + 1), positive
        Normalised exponentiated similarities.
    n_data : int

    Returns
    -------
    torch.Tensor, scalar
    """
    b, k1 = scores.shape
    m_pn = (k1 - 1) / float(n_data)
    pos = scores[:, 0]
    neg = scores[:, 1:]
    log_d1 = torch.log(pos / (pos + m_pn + eps))
    log_d0 = torch.log(m_pn / (neg + m_pn + eps))
    return -(log_d1.sum() + log_d0.sum()) / b


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def _get(out: dict, key: str, who: str) -> torch.Tensor:
    if key not in out or out[key] is None:
        raise ValidationError(f"{who} output has no '{key}' entry", key=key)
    return out[key]


def _as_list(x) -> list[torch.Tensor]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


class KDLoss(nn.Module):
    """Vanilla KD on the outputs: ``weight * KL(softmax(t/T) || softmax(s/T)) * T^2``.

    Parameters
    ----------
    temperature : float
        T (4).
    weight : float
    key : str, optional
        Output entry to use; None: ``logits`` when present, else ``params``.
    """

    def __init__(self, temperature: float = 4.0, weight: float = DEFAULT_WEIGHTS["kd"], key: str | None = None):
        super().__init__()
        self.temperature = float(temperature)
        self.weight = float(weight)
        self.key = key

    def _pick(self, out: dict, who: str) -> torch.Tensor:
        if self.key is not None:
            return _get(out, self.key, who)
        return _get(out, "logits" if out.get("logits") is not None else "params", who)

    def forward(self, student_out: dict, teacher_out: dict, index: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted loss (scalar); ``index`` is unused."""
        s = self._pick(student_out, "student")
        t = self._pick(teacher_out, "teacher").detach()
        return self.weight * kd_kl(s, t, self.temperature)


class ATLoss(nn.Module):
    """Attention transfer: ``weight * sum over layers of at_distance(s_l, t_l)``.

    Parameters
    ----------
    weight : float
        1000.
    p : float
        Power of the activations (2).
    key : str
        Entry holding the map or list of maps (``maps``); student and teacher lists pair up
        in order.
    """

    def __init__(self, weight: float = DEFAULT_WEIGHTS["at"], p: float = 2.0, key: str = "maps"):
        super().__init__()
        self.weight = float(weight)
        self.p = float(p)
        self.key = key

    def forward(self, student_out: dict, teacher_out: dict, index: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted loss (scalar); ``index`` is unused."""
        s_maps = _as_list(_get(student_out, self.key, "student"))
        t_maps = _as_list(_get(teacher_out, self.key, "teacher"))
        if len(s_maps) != len(t_maps):
            raise ValidationError(f"{len(s_maps)} student maps vs {len(t_maps)} teacher maps", key=self.key)
        total = sum(at_distance(s, t.detach(), self.p) for s, t in zip(s_maps, t_maps))
        return self.weight * total


class SPLoss(nn.Module):
    """Similarity preserving: ``weight * ||G_t - G_s||_F^2 / B^2`` summed over the given layers.

    Parameters
    ----------
    weight : float
        3000.
    key : str
        Entry holding a feature tensor or a list of them (``features``: the pooled vector).
    """

    def __init__(self, weight: float = DEFAULT_WEIGHTS["sp"], key: str = "features"):
        super().__init__()
        self.weight = float(weight)
        self.key = key

    def forward(self, student_out: dict, teacher_out: dict, index: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted loss (scalar); ``index`` is unused."""
        s_list = _as_list(_get(student_out, self.key, "student"))
        t_list = _as_list(_get(teacher_out, self.key, "teacher"))
        if len(s_list) != len(t_list):
            raise ValidationError(f"{len(s_list)} student vs {len(t_list)} teacher entries", key=self.key)
        return self.weight * sum(sp_distance(s, t.detach()) for s, t in zip(s_list, t_list))


class CCLoss(nn.Module):
    """Correlation congruence on linear embeddings of the pooled features.

    Student and teacher features are mapped by learnable ``Linear(dim, embed_dim)`` layers
    (separate for each side, not normalised) and compared with :func:`cc_distance`.

    Parameters
    ----------
    s_dim, t_dim : int
        Feature sizes.
    embed_dim : int or None
        128. None: compare the features themselves (needs ``s_dim == t_dim``); the loss is then
        exactly zero when they agree.
    weight : float
        0.02.
    key : str
    """

    def __init__(
        self,
        s_dim: int,
        t_dim: int,
        embed_dim: int | None = 128,
        weight: float = DEFAULT_WEIGHTS["cc"],
        key: str = "features",
    ):
        super().__init__()
        self.weight = float(weight)
        self.key = key
        if embed_dim is None:
            if s_dim != t_dim:
                raise ValidationError(f"without embeddings s_dim ({s_dim}) must equal t_dim ({t_dim})", key="embed_dim")
            self.embed_s: nn.Module = nn.Identity()
            self.embed_t: nn.Module = nn.Identity()
        else:
            self.embed_s = nn.Linear(s_dim, embed_dim)
            self.embed_t = nn.Linear(t_dim, embed_dim)

    def forward(self, student_out: dict, teacher_out: dict, index: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted loss (scalar); ``index`` is unused. Needs B >= 2."""
        s = _get(student_out, self.key, "student")
        t = _get(teacher_out, self.key, "teacher").detach()
        e_s = self.embed_s(s.reshape(s.shape[0], -1))
        e_t = self.embed_t(t.reshape(t.shape[0], -1))
        return self.weight * cc_distance(e_s, e_t)


class RKDLoss(nn.Module):
    """Relational KD: ``weight * (w_dist * distance term + w_angle * angle term)``.

    Parameters
    ----------
    w_dist : float
        25.
    w_angle : float
        50.
    weight : float
        1.
    key : str
        ``features``; maps are flattened per sample.
    """

    def __init__(
        self,
        w_dist: float = 25.0,
        w_angle: float = 50.0,
        weight: float = DEFAULT_WEIGHTS["rkd"],
        key: str = "features",
    ):
        super().__init__()
        self.w_dist = float(w_dist)
        self.w_angle = float(w_angle)
        self.weight = float(weight)
        self.key = key

    def forward(self, student_out: dict, teacher_out: dict, index: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted loss (scalar); ``index`` is unused. Needs B >= 2."""
        s = _get(student_out, self.key, "student")
        t = _get(teacher_out, self.key, "teacher").detach()
        s = s.reshape(s.shape[0], -1)
        t = t.reshape(t.shape[0], -1)
        loss = s.new_zeros(())
        if self.w_dist:
            loss = loss + self.w_dist * rkd_distance_loss(s, t)
        if self.w_angle:
            loss = loss + self.w_angle * rkd_angle_loss(s, t)
        return self.weight * loss


class PKTLoss(nn.Module):
    """Probabilistic knowledge transfer: ``weight * sum over keys of pkt_distance``.

    Parameters
    ----------
    weight : float
        30000 (RepDistiller). The Cross-Modal-Perceptionist recipe uses 10000 with
        ``keys=("features", "early")``.
    keys : sequence of str
        Entries to compare; maps are flattened per sample.
    """

    def __init__(self, weight: float = DEFAULT_WEIGHTS["pkt"], keys: Sequence[str] = ("features",)):
        super().__init__()
        self.weight = float(weight)
        self.keys = tuple(keys)

    def forward(self, student_out: dict, teacher_out: dict, index: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted loss (scalar); ``index`` is unused."""
        total = 0.0
        for key in self.keys:
            s = _get(student_out, key, "student")
            t = _get(teacher_out, key, "teacher").detach()
            total = total + pkt_distance(s, t)
        return self.weight * total


class _VIDPair(nn.Module):
    """One VID regressor (three 1x1 convs) with per-channel variances."""

    def __init__(self, s_ch: int, t_ch: int, mid_ch: int, init_var: float, eps: float):
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(s_ch, mid_ch, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_ch, mid_ch, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_ch, t_ch, 1, bias=False),
        )
        self.eps = float(eps)
        # softplus(raw) + eps == init_var at the start
        raw = math.log(math.expm1(init_var - eps))
        self.raw_var = nn.Parameter(torch.full((t_ch,), raw))

    def variance(self) -> torch.Tensor:
        return F.softplus(self.raw_var) + self.eps

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if s.dim() == 2:
            s = s[:, :, None, None]
        if t.dim() == 2:
            t = t[:, :, None, None]
        if s.shape[2:] != t.shape[2:]:
            size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
            s = F.adaptive_avg_pool2d(s, size)
            t = F.adaptive_avg_pool2d(t, size)
        mu = self.regressor(s)
        var = self.variance().view(1, -1, 1, 1)
        return (0.5 * ((mu - t).pow(2) / var + var.log())).mean()


class VIDLoss(nn.Module):
    """Variational information distillation.

    For each (student, teacher) pair a 1x1-conv regressor (s -> mid -> mid -> t channels, ReLU
    between) predicts the teacher features ``mu`` from the student's, with learned per-channel
    variances ``sigma^2 = softplus(raw) + eps`` starting at ``init_var``; the loss is
    ``mean(0.5 * ((mu - t)^2 / sigma^2 + log sigma^2))``, summed over pairs and weighted.

    Parameters
    ----------
    s_channels, t_channels : int or sequence of int
        Channels per pair (one int each: a single pair).
    key : str, optional
        Entry to read; default ``features`` for a single pair, ``maps`` for lists. Vectors
        (B, C) are treated as (B, C, 1, 1) maps; maps of different sizes are average-pooled to
        the smaller one.
    mid_channels : int or sequence of int, optional
        Hidden width of each regressor; default the teacher channels.
    init_var : float
        5.0.
    eps : float
        1e-5.
    weight : float
        1.
    """

    def __init__(
        self,
        s_channels: int | Sequence[int],
        t_channels: int | Sequence[int],
        key: str | None = None,
        mid_channels: int | Sequence[int] | None = None,
        init_var: float = 5.0,
        eps: float = 1e-5,
        weight: float = DEFAULT_WEIGHTS["vid"],
    ):
        super().__init__()
        single = isinstance(s_channels, int) and isinstance(t_channels, int)
        s_list = [s_channels] if isinstance(s_channels, int) else list(s_channels)
        t_list = [t_channels] if isinstance(t_channels, int) else list(t_channels)
        if len(s_list) != len(t_list):
            raise ValidationError(f"{len(s_list)} student vs {len(t_list)} teacher channel counts", key="t_channels")
        if mid_channels is None:
            m_list = t_list
        else:
            m_list = [mid_channels] * len(t_list) if isinstance(mid_channels, int) else list(mid_channels)
        self.key = key if key is not None else ("features" if single else "maps")
        self.weight = float(weight)
        self.pairs = nn.ModuleList(
            _VIDPair(int(s), int(t), int(m), init_var, eps) for s, t, m in zip(s_list, t_list, m_list)
        )

    def forward(self, student_out: dict, teacher_out: dict, index: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted loss (scalar); ``index`` is unused."""
        s_list = _as_list(_get(student_out, self.key, "student"))
        t_list = _as_list(_get(teacher_out, self.key, "teacher"))
        if not (len(s_list) == len(t_list) == len(self.pairs)):
            raise ValidationError(
                f"expected {len(self.pairs)} pairs, got {len(s_list)} student / {len(t_list)} teacher", key=self.key
            )
        total = sum(pair(s, t.detach()) for pair, s, t in zip(self.pairs, s_list, t_list))
        return self.weight * total


class CRDLoss(nn.Module):
    """Contrastive representation distillation (NCE with a momentum memory bank).

    Student and teacher features go through ``Linear(dim, embed_dim)`` + L2 normalisation. Two
    memory banks hold one embedding per training sample (student bank, teacher bank). For each
    sample, its student embedding is scored against the teacher bank at its own index (the
    positive) and at ``n_negatives`` other indices, and vice versa;
    ``score = exp(<v, m> / temperature) / Z`` with ``Z`` fixed from the first batch
    (mean score * n_data). The loss is the sum of the two NCE losses (:func:`nce_loss`).
    In training mode the banks are then updated at the batch's indices:
    ``m <- normalise(momentum * m + (1 - momentum) * v)``.

    Parameters
    ----------
    s_dim, t_dim : int
        Feature sizes.
    n_data : int
        Number of training samples (size of each bank), >= 2.
    embed_dim : int
        128.
    n_negatives : int
        16384 (drawn uniformly with replacement among the other samples).
    temperature : float
        0.07.
    momentum : float
        0.5.
    weight : float
        0.8.
    key : str
        ``features``.
    seed : int
        Seeds the bank initialisation and the negative sampling.

    Notes
    -----
    Call with ``index`` (B,) int64, the samples' dataset indices; optionally
    ``contrast_index`` (B, K + 1) with the positives in column 0 to fix the negatives.
    """

    def __init__(
        self,
        s_dim: int,
        t_dim: int,
        n_data: int,
        embed_dim: int = 128,
        n_negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
        weight: float = DEFAULT_WEIGHTS["crd"],
        key: str = "features",
        seed: int = 0,
    ):
        super().__init__()
        if int(n_data) < 2:
            raise ValidationError(f"need at least 2 training samples, got {n_data}", key="n_data")
        if int(n_negatives) < 1:
            raise ValidationError(f"need at least one negative, got {n_negatives}", key="n_negatives")
        self.n_data = int(n_data)
        self.embed_dim = int(embed_dim)
        self.n_negatives = int(n_negatives)
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.weight = float(weight)
        self.key = key
        self.embed_s = nn.Linear(s_dim, embed_dim)
        self.embed_t = nn.Linear(t_dim, embed_dim)
        gen = torch.Generator().manual_seed(int(seed))
        stdv = 1.0 / math.sqrt(embed_dim / 3.0)
        self.register_buffer("memory_s", (torch.rand(self.n_data, embed_dim, generator=gen) * 2 - 1) * stdv)
        self.register_buffer("memory_t", (torch.rand(self.n_data, embed_dim, generator=gen) * 2 - 1) * stdv)
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        self._gen = torch.Generator().manual_seed(int(seed) + 1)

    def sample_contrast_index(self, index: torch.Tensor) -> torch.Tensor:
        """(B, K + 1) indices: the positives in column 0, then K uniform negatives != positive."""
        b = index.shape[0]
        neg = torch.randint(0, self.n_data - 1, (b, self.n_negatives), generator=self._gen)
        neg = neg.to(index.device)
        neg = neg + (neg >= index.unsqueeze(1)).to(neg.dtype)  # skip the positive
        return torch.cat([index.unsqueeze(1), neg], dim=1)

    def embed(self, student_out: dict, teacher_out: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised embeddings, each (B, embed_dim)."""
        s = _get(student_out, self.key, "student")
        t = _get(teacher_out, self.key, "teacher").detach()
        v_s = F.normalize(self.embed_s(s.reshape(s.shape[0], -1)), dim=1)
        v_t = F.normalize(self.embed_t(t.reshape(t.shape[0], -1)), dim=1)
        return v_s, v_t

    def forward(
        self,
        student_out: dict,
        teacher_out: dict,
        index: torch.Tensor | None = None,
        contrast_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Weighted loss (scalar).

        Parameters
        ----------
        student_out, teacher_out : dict
        index : torch.Tensor, shape (B,), int64
            Dataset indices in [0, n_data).
        contrast_index : torch.Tensor, shape (B, K + 1), int64, optional
        """
        if index is None:
            raise ValidationError("CRD needs the samples' dataset indices", key="index")
        index = torch.as_tensor(index).to(self.memory_s.device, torch.int64).reshape(-1)
        if bool((index < 0).any()) or bool((index >= self.n_data).any()):
            raise ValidationError(f"indices must lie in [0, {self.n_data})", key="index")
        v_s, v_t = self.embed(student_out, teacher_out)
        if contrast_index is None:
            contrast_index = self.sample_contrast_index(index)
        idx = contrast_index.to(index.device)
        # student embedding against the teacher bank, teacher embedding against the student bank
        w_t = self.memory_t[idx].detach()  # (B, K+1, D)
        w_s = self.memory_s[idx].detach()
        out_s = torch.exp(torch.bmm(w_t, v_s.unsqueeze(2)).squeeze(2) / self.temperature)
        out_t = torch.exp(torch.bmm(w_s, v_t.unsqueeze(2)).squeeze(2) / self.temperature)
        if float(self.z_s) < 0:
            self.z_s.fill_(float(out_s.detach().mean()) * self.n_data)
        if float(self.z_t) < 0:
            self.z_t.fill_(float(out_t.detach().mean()) * self.n_data)
        out_s = out_s / self.z_s
        out_t = out_t / self.z_t
        loss = nce_loss(out_s, self.n_data) + nce_loss(out_t, self.n_data)
        if self.training:
            with torch.no_grad():
                m = self.momentum
                new_s = F.normalize(self.memory_s[index] * m + v_s.detach() * (1 - m), dim=1)
                new_t = F.normalize(self.memory_t[index] * m + v_t.detach() * (1 - m), dim=1)
                self.memory_s.index_copy_(0, index, new_s)
                self.memory_t.index_copy_(0, index, new_t)
        return self.weight * loss


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------


def make_kd_loss(
    name: str,
    s_dim: int,
    t_dim: int,
    *,
    weight: float | None = None,
    s_channels: Sequence[int] | None = None,
    t_channels: Sequence[int] | None = None,
    n_data: int | None = None,
    **kwargs,
) -> nn.Module:
    """Build a distillation loss by name.

    Parameters
    ----------
    name : str
        One of :data:`KD_NAMES` (case-insensitive).
    s_dim, t_dim : int
        Sizes of the student's and teacher's pooled ``features`` (CC, CRD, VID).
    weight : float, optional
        Overrides the default weight (:data:`DEFAULT_WEIGHTS`).
    s_channels, t_channels : sequence of int, optional
        Channels of the ``maps`` (VID on maps; without them VID uses ``features``).
    n_data : int, optional
        Training-set size; required for CRD.
    **kwargs
        Passed to the loss class (e.g. ``temperature``, ``n_negatives``, ``keys``).

    Returns
    -------
    nn.Module
        Called as ``loss(student_out, teacher_out, index=None)``.
    """
    key = str(name).lower()
    if key not in KD_NAMES:
        raise ValidationError(f"unknown distillation loss '{name}' (choose from {', '.join(KD_NAMES)})", key="kd")
    w = DEFAULT_WEIGHTS[key] if weight is None else float(weight)
    if key == "kd":
        return KDLoss(weight=w, **kwargs)
    if key == "at":
        return ATLoss(weight=w, **kwargs)
    if key == "sp":
        return SPLoss(weight=w, **kwargs)
    if key == "cc":
        return CCLoss(s_dim, t_dim, weight=w, **kwargs)
    if key == "rkd":
        return RKDLoss(weight=w, **kwargs)
    if key == "pkt":
        return PKTLoss(weight=w, **kwargs)
    if key == "vid":
        if s_channels is not None or t_channels is not None:
            if s_channels is None or t_channels is None:
                raise ValidationError("VID on maps needs both s_channels and t_channels", key="t_channels")
            return VIDLoss(list(s_channels), list(t_channels), weight=w, **kwargs)
        return VIDLoss(int(s_dim), int(t_dim), weight=w, **kwargs)
    # crd
    if n_data is None:
        raise ValidationError("CRD needs n_data, the number of training samples", key="n_data")
    return CRDLoss(s_dim, t_dim, n_data, weight=w, **kwargs)
