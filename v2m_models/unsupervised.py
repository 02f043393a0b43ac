"""The unsupervised Voice2Mesh trainer (``v2m-train unsupervised``) and its predictor.

Model (the paper, §1 of docs FACTS; Wen et al. 2019 for the GAN)
----------------------------------------------------------------
- **Voice encoder**: the pretrained speaker-classification encoder (``encoder``, a
  ``v2m-train voice-encoder`` or supervised checkpoint), frozen; its L2-normalised 64-d embedding
  of a 3-8 s crop feeds the generator.
- **GAN** (Wen et al.): :class:`~v2m_models.nets.Generator` (embedding -> 64x64 RGB face in
  [-1, 1]) against a :class:`~v2m_models.nets.FaceCritic` (a shared face trunk with a real/fake
  head and an identity head over the training identities). Per iteration, first the critic:
  ``BCE(D(real), 1) + BCE(D(fake), 0) + CE(C(real), id)`` on real 64x64 crops of the speakers'
  own faces (one random face of each sample's identity, randomly flipped horizontally when
  ``flip``); then the generator: ``BCE(D(fake), 1) + CE(C(fake), id)`` against the updated critic.
- **Student** (the paper's unsupervised 3DMM regressor): a MobileNetV2
  :class:`~v2m_models.teacher.FaceRegressor` from scratch, fed the generated face bilinearly
  upsampled to 120x120, distilled from the frozen image -> 3DMM ``teacher``
  (:func:`v2m_models.teacher.load_teacher`) run on the same image:
  ``param_weight * MSE(normalised 62 params) + mesh_weight * mesh MSE + KD loss`` (+ the
  triplet below). With ``mesh_space="neutral"`` the mesh MSE is the mean squared vertex
  distance (mm^2) between the student's and the teacher's neutral-pose meshes, computed exactly
  from the coefficient difference ``d`` as ``d^T G d`` with ``G = W^T W / n_vertices`` for the
  morphable model's basis ``W`` (no vertices are formed).
  The KD loss is one of :data:`v2m_models.kd.KD_NAMES` with the reference defaults, except
  ``pkt``, which follows the Cross-Modal-Perceptionist recipe (weight 10,000 on the pooled
  features and on the early 8x8 map). The teacher's outputs are targets (no gradient through it).

Two recipes (:data:`RECIPES`, ``UnsupervisedConfig.from_recipe``; docs/training.md compares them):

- ``paper`` (the defaults): the generated image is detached for the student, so the distillation
  trains the student only and the generator learns from the GAN terms alone; parameter MSE + mesh
  MSE on neutral meshes + KD; batch 128.
- ``official`` (the released ``gan_train_cascade.py``): no parameter MSE; the mesh MSE on the dense
  posed vertices (each network's 3x4 pose applied: pixels of the 120x120 input, the mean over
  vertices and coordinates, as ``torch.nn.MSELoss``); a triplet margin loss (weight 1.5, margin 1)
  on the student's posed meshes; ``joint_generator``: the generator and the student are updated by
  one backward pass of the GAN terms plus the student's loss, so distillation and triplet
  gradients reach the generator; batch 64.

The triplet (``triplet_weight > 0``): each sample's anchor voice crop, a positive (a crop of another
utterance of the same identity) and a negative (a crop of an utterance of another identity), drawn
from ``(seed, iteration)`` by :class:`v2m_models.data.BatchPlanner` (:func:`v2m_models.data.triplet_items`),
go through the frozen encoder, the generator and the student in one forward pass each (3B
samples); ``max(d(a, p) - d(a, n) + margin, 0)`` with ``d`` the Euclidean distance between the two
meshes flattened to vectors (:func:`mesh_distance`: mm for neutral meshes, pixels for posed ones).
The GAN terms, the mesh MSE and the KD loss use the anchors only.

Adam (lr 2e-4, betas 0.5/0.999) for the generator, the critic, and the student (with the KD
loss's own parameters). ``kd="none"`` trains the GAN alone
(checkpoint kind ``"gan"``; no student, the teacher optional; the triplet and the joint generator
do not apply): the generator for the cascade baseline (:mod:`v2m_models.cascade`).

Validation on the test references (the benchmark's three utterances per identity, whole):
``val_kd_param`` (the student's normalised parameter error against the teacher on the generated
faces) and, when the morphable model is found, ER, ARE_mean, NME of the student (with the mean
face's ``*_meanface``) and of the teacher on the same generated faces (``*_cascade``: the
baseline with the current generator).

Checkpoint (kind ``"unsupervised"``, or ``"gan"``) modules: ``encoder`` and ``teacher``
(frozen copies, so the file is self-contained), ``generator``, ``critic``, ``student``, ``kd``;
``task`` entries: ``classes``, ``encoder`` (channels), ``generator`` (channels), ``critic``
(channels), ``student`` / ``teacher`` (network shapes), ``kd``, ``encoder_source``,
``teacher_source``, ``recipe`` (the recipe's name and the option values it concerns; the whole
config is stored too). :func:`load_predictor` runs voice -> encoder -> generator -> student.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from v2m_bench.errors import ValidationError

from .data import (
    BatchPlanner,
    CoefficientStats,
    CropConfig,
    FaceBank,
    TrainingSet,
    VoiceBatches,
    select_test_utterances,
    training_set,
    whole_utterances,
)
from .kd import KD_NAMES, PKTLoss, make_kd_loss
from .nets import VOICE_CHANNELS, FaceCritic, Frozen, Generator, VoiceEncoder
from .supervised import VoiceTask, embed_utterances, geometric_metrics, load_encoder, usable_bfm
from .teacher import FaceRegressor, load_teacher, make_regressor
from .training import FitResult, Run, TrainConfig, fit, make_adam

__all__ = [
    "GENERATOR_CHANNELS",
    "TRUNK_CHANNELS",
    "MESH_SPACES",
    "RECIPES",
    "UnsupervisedConfig",
    "posed_vertices",
    "mesh_distance",
    "triplet_margin_loss",
    "UnsupervisedTask",
    "VoiceFacePredictor",
    "gan_training_set",
    "mesh_gram",
    "make_distillation",
    "train_unsupervised",
    "load_predictor",
    "load_generator",
]

#: Wen et al.'s generator widths.
GENERATOR_CHANNELS: tuple = (1024, 512, 256, 128, 64)
#: Wen et al.'s face-trunk widths.
TRUNK_CHANNELS: tuple = (32, 64, 128, 256, 512)
#: Where the mesh loss and the triplet distance act.
MESH_SPACES: tuple = ("neutral", "posed")
#: The two recipes (docs/training.md): the option values each preset sets.
RECIPES: dict = {
    # the paper: parameter L2 + neutral mesh L2 + PKT, the generator trained by the GAN alone
    "paper": {"batch_size": 128, "param_weight": 1.0, "mesh_weight": 0.5, "mesh_space": "neutral", "triplet_weight": 0.0,
              "triplet_margin": 1.0, "joint_generator": False},
    # the official release (gan_train_cascade.py): 0.5 MSE of posed dense vertices + PKT + 1.5 triplet,
    # the student's loss also trains the generator, batch 64
    "official": {"batch_size": 64, "param_weight": 0.0, "mesh_weight": 0.5, "mesh_space": "posed", "triplet_weight": 1.5,
                 "triplet_margin": 1.0, "joint_generator": True},
}


# ------------------------------------------------------------------------------------- config
@dataclass
class UnsupervisedConfig(TrainConfig):
    """:class:`~v2m_models.training.TrainConfig` plus the unsupervised options.

    Attributes
    ----------
    batch_size : int
        128 (``paper``; 64 in the ``official`` recipe).
    betas : tuple of float
        (0.5, 0.999), Wen et al.
    encoder : str
        Pretrained voice-encoder checkpoint (``v2m-train voice-encoder``; a supervised one works too).
    teacher : str, optional
        Image -> 3DMM teacher (``v2m-train teacher`` checkpoint or a state dict of the same
        architecture); required unless ``kd="none"``.
    kd : str
        Feature distillation loss: one of ``pkt kd at sp cc rkd crd vid``, or ``none`` (GAN only).
    kd_weight : float, optional
        Override of the loss's default weight.
    param_weight, mesh_weight : float
        Weights of the normalised-parameter MSE and of the mesh MSE (mm^2).
    student_width : float
        Width multiplier of the student MobileNetV2 (1.0).
    student_last_channels : int, optional
        Width of the student's last conv (1280; smaller for tests).
    generator_channels, trunk_channels : tuple of int
        GAN widths (Wen et al.'s by default; smaller for tests).
    flip : bool
        Random horizontal flips of the real faces.
    gan_weight : float
        Weight of the generator's identity term relative to its real/fake term (1).
    crd_negatives : int
        Negatives per sample of the CRD loss (16,384).
    val_utterances : int
        Utterances per test identity in validation (3).
    recipe : {"paper", "official"}
        The preset the options started from (:data:`RECIPES`, :meth:`from_recipe`); recorded in
        the checkpoint. The dataclass defaults are the ``paper`` preset.
    triplet_weight : float
        Weight of the triplet margin loss on the student's meshes (0: off; 1.5 official). Each
        sample's anchor voice, a positive (another utterance of the same identity) and a negative
        (an utterance of another identity) go through the generator and the student.
    triplet_margin : float
        Its margin, in the units of the mesh distance (1.0, torch's ``TripletMarginLoss`` default).
    joint_generator : bool
        The student's loss (distillation, mesh, triplet) also trains the generator (the official
        release); False: the generated faces are detached for the student (the paper: the
        generator learns from the GAN terms alone).
    mesh_space : {"neutral", "posed"}
        Where the mesh loss and the triplet distance act: ``neutral`` meshes (mm, from the
        coefficients alone, exactly through :func:`mesh_gram`), or the ``posed`` dense vertices
        (each network's pose applied; pixels of the 120x120 input, as the official release).
    """

    batch_size: int = 128
    betas: tuple = (0.5, 0.999)
    encoder: str = ""
    teacher: str | None = None
    kd: str = "pkt"
    kd_weight: float | None = None
    param_weight: float = 1.0
    mesh_weight: float = 0.5
    student_width: float = 1.0
    student_last_channels: int | None = None
    generator_channels: tuple = GENERATOR_CHANNELS
    trunk_channels: tuple = TRUNK_CHANNELS
    flip: bool = True
    gan_weight: float = 1.0
    crd_negatives: int = 16384
    val_utterances: int = 3
    recipe: str = "paper"
    triplet_weight: float = 0.0
    triplet_margin: float = 1.0
    joint_generator: bool = False
    mesh_space: str = "neutral"

    @classmethod
    def from_recipe(cls, recipe: str = "paper", **options) -> "UnsupervisedConfig":
        """A config of preset ``recipe`` (:data:`RECIPES`); ``options`` override the preset's values."""
        name = str(recipe).lower()
        if name not in RECIPES:
            raise ValidationError(f"unknown recipe {recipe!r} (choose from {', '.join(RECIPES)})", key="recipe")
        return cls(**{**RECIPES[name], **options, "recipe": name})

    def __post_init__(self):
        super().__post_init__()
        self.recipe = str(self.recipe).lower()
        if self.recipe not in RECIPES:
            raise ValidationError(f"unknown recipe {self.recipe!r} (choose from {', '.join(RECIPES)})", key="recipe")
        if self.mesh_space not in MESH_SPACES:
            raise ValidationError(f"must be neutral or posed, got {self.mesh_space!r}", key="mesh_space")
        self.joint_generator = bool(self.joint_generator)
        for k in ("triplet_weight", "triplet_margin"):
            v = float(getattr(self, k))
            if not (v >= 0 and np.isfinite(v)):
                raise ValidationError(f"must be a finite number >= 0, got {getattr(self, k)}", key=k)
        self.kd = str(self.kd).lower()
        if self.kd not in KD_NAMES + ("none",):
            raise ValidationError(f"unknown distillation loss {self.kd!r} (choose from {', '.join(KD_NAMES)}, none)", key="kd")
        if not self.encoder:
            raise ValidationError("the unsupervised model needs the pretrained voice encoder (--encoder)", key="encoder")
        if self.kd != "none" and not self.teacher:
            raise ValidationError("distillation needs a teacher (--teacher), or --kd none for the GAN alone", key="teacher")
        self.generator_channels = tuple(int(c) for c in self.generator_channels)
        self.trunk_channels = tuple(int(c) for c in self.trunk_channels)
        for k in ("param_weight", "mesh_weight", "gan_weight"):
            if not float(getattr(self, k)) >= 0:
                raise ValidationError(f"must be >= 0, got {getattr(self, k)}", key=k)
        if int(self.crd_negatives) < 1:
            raise ValidationError(f"must be >= 1, got {self.crd_negatives}", key="crd_negatives")
        if not float(self.student_width) > 0:
            raise ValidationError(f"must be positive, got {self.student_width}", key="student_width")


# ------------------------------------------------------------------------------------- pieces
def gan_training_set(split) -> tuple[TrainingSet, np.ndarray, np.ndarray]:
    """Training identities with both utterances and face images.

    Returns
    -------
    tset : TrainingSet
        Classes, their utterances and labels (as :func:`v2m_models.data.training_set`).
    images : (M,) int64
        Image numbers of the classes' faces.
    face_labels : (M,) int64
        Class of each image.
    """
    full = training_set(split)
    img_ident = split.images["identity"].astype(np.int64) if split.n_images else np.zeros(0, np.int64)
    keep = np.flatnonzero(np.isin(full.identities, img_ident))
    if len(keep) == 0:
        raise ValidationError("no training identity has both utterances and face images", key="train")
    new = np.full(len(full.identities), -1, np.int64)
    new[keep] = np.arange(len(keep))
    sel = new[full.labels] >= 0
    ids = full.identities[keep]
    label_of = np.full(split.n_identities, -1, np.int64)
    label_of[ids] = np.arange(len(ids))
    images = np.flatnonzero(label_of[img_ident] >= 0).astype(np.int64)
    tset = TrainingSet(split=split, identities=ids, names=[full.names[i] for i in keep], utterances=full.utterances[sel],
                       labels=new[full.labels[sel]])
    return tset, images, label_of[img_ident[images]]


def mesh_gram(bfm) -> np.ndarray:
    """``G = W^T W / n_vertices / 1e6`` (50, 50) float64 for the model's stacked basis ``W`` (3N, 50).

    For a coefficient difference ``d`` (BFM units), ``d^T G d`` is the mean squared distance
    between the two meshes' vertices in mm^2 (1 mm = 1000 BFM units).
    """
    w = torch.from_numpy(np.concatenate([np.asarray(bfm.shape_basis, np.float64),
                                         np.asarray(bfm.expression_basis, np.float64)], axis=1))
    return (w.T @ w).numpy() / (w.shape[0] // 3) / 1e6  # torch's float64 GEMM: ~10x numpy's on the shared CPUs


def posed_vertices(pose, coefficients, mean, basis):
    """Dense posed vertices ``A (mean + W c) + t`` of a batch (torch, differentiable).

    Parameters
    ----------
    pose : torch.Tensor, (B, 12)
        Row-major 3x4 ``[A | t]`` (:func:`v2m_models.teacher.crop_pose`: pixels of the network input).
    coefficients : torch.Tensor, (B, 50)
        40 shape + 10 expression coefficients (BFM units).
    mean : torch.Tensor, (N, 3)
        Mean face (BFM units).
    basis : torch.Tensor, (3N, 50)
        Stacked shape and expression bases (rows x0, y0, z0, x1, ...).

    Returns
    -------
    torch.Tensor, (B, N, 3)
        Vertices in the pose's units (pixels).
    """
    p = pose.reshape(-1, 3, 4)
    v = mean.unsqueeze(0) + (coefficients @ basis.T).reshape(coefficients.shape[0], -1, 3)
    return torch.einsum("bij,bnj->bni", p[:, :, :3], v) + p[:, None, :, 3]


def mesh_distance(a, b, gram=None, n_vertices: int | None = None, eps: float = 1e-12):
    """Euclidean distance between two batches of meshes, each flattened to one vector.

    Parameters
    ----------
    a, b : torch.Tensor
        Either dense vertices (B, N, 3), or, with ``gram``, coefficients (B, 50) in BFM units
        (neutral meshes: the distance is ``sqrt(N d^T G d)``, exact, no vertices formed).
    gram : torch.Tensor, (50, 50), optional
        :func:`mesh_gram` of the model (mm^2 per vertex).
    n_vertices : int, optional
        N, with ``gram``.
    eps : float
        Added under the square root (a finite gradient at zero distance).

    Returns
    -------
    torch.Tensor, (B,)
        Distances: mm for neutral meshes, the vertices' units (pixels) for dense ones.
    """
    d = a - b
    if gram is not None:
        sq = torch.einsum("bi,ij,bj->b", d, gram, d) * float(n_vertices)
    else:
        sq = (d * d).flatten(1).sum(1)
    return torch.sqrt(sq.clamp_min(0) + eps)


def triplet_margin_loss(d_ap, d_an, margin: float):
    """``mean(max(d_ap - d_an + margin, 0))``: zero when every anchor is closer to its positive than
    to its negative by at least ``margin``.

    Parameters
    ----------
    d_ap, d_an : torch.Tensor, (B,)
        Anchor-positive and anchor-negative distances.
    margin : float

    Returns
    -------
    torch.Tensor, 0-d
    """
    return torch.relu(d_ap - d_an + float(margin)).mean()


def make_distillation(name: str, student: FaceRegressor, teacher: FaceRegressor, *, n_data: int, weight=None,
                      crd_negatives: int = 16384, seed: int = 0):
    """The feature-distillation loss ``name`` sized for ``student`` and ``teacher``.

    ``pkt`` is the Cross-Modal-Perceptionist recipe (pooled features and the early map, weight
    10,000); ``vid`` works on the four resolution maps; ``crd`` has one memory slot per training
    utterance (``n_data``); the others use :func:`v2m_models.kd.make_kd_loss` defaults.
    """
    s, t = student.net.backbone, teacher.net.backbone
    if name == "pkt":
        return PKTLoss(weight=10000.0 if weight is None else float(weight), keys=("features", "early"))
    if name == "vid":
        return make_kd_loss("vid", s.feature_dim, t.feature_dim, weight=weight, s_channels=s.map_channels,
                            t_channels=t.map_channels)
    if name == "crd":
        return make_kd_loss("crd", s.feature_dim, t.feature_dim, weight=weight, n_data=n_data,
                            n_negatives=int(crd_negatives), seed=int(seed))
    return make_kd_loss(name, s.feature_dim, t.feature_dim, weight=weight)


def _contrast_index(index: torch.Tensor, n_data: int, k: int, seed: int, iteration: int) -> torch.Tensor:
    """CRD's (B, k + 1) positives-then-negatives, drawn from ``(seed, iteration)`` (exact resume)."""
    g = torch.Generator().manual_seed(int(np.random.default_rng([seed, 0xC4D, iteration]).integers(2**62)))
    idx = index.cpu()
    neg = torch.randint(0, n_data - 1, (idx.shape[0], int(k)), generator=g)
    neg = neg + (neg >= idx.unsqueeze(1)).to(neg.dtype)
    return torch.cat([idx.unsqueeze(1), neg], dim=1).to(index.device)


def _float_out(out: dict) -> dict:
    """Outputs cast to float32 (losses are computed outside autocast)."""
    return {k: ([m.float() for m in v] if isinstance(v, list) else (v.float() if v is not None else None))
            for k, v in out.items()}


def _teacher_arch(reg: FaceRegressor) -> dict:
    b = reg.net.backbone
    return {"width_mult": float(b.width_mult), "last_channels": int(b.feature_dim), "input_size": int(reg.net.input_size or 120),
            "input_format": reg.input_format}


# ------------------------------------------------------------------------------------- the task
class UnsupervisedTask(VoiceTask):
    """GAN + distilled student (see the module docstring)."""

    predictor = "v2m_models.unsupervised:load_predictor"

    def __init__(self, config: UnsupervisedConfig, *, dataset=None):
        self.kind = "gan" if config.kd == "none" else "unsupervised"
        if self.kind == "gan":
            self.predictor = ""
        enc, ck = load_encoder(config.encoder)
        self._encoder = enc
        self._teacher = None
        if config.teacher:
            self._teacher, _ = load_teacher(config.teacher, bfm=config.bfm)
        self._faces_info = None
        #: triplets and the joint generator act through the student: none without one
        self.triplets = self.kind == "unsupervised" and float(config.triplet_weight) > 0
        self.joint = self.kind == "unsupervised" and bool(config.joint_generator)
        super().__init__(config, dataset=dataset)

    def _training_set(self):
        tset, images, face_labels = gan_training_set(self.train_split)
        self._faces_info = (images, face_labels)
        return tset

    def _batches_source(self, run: Run) -> VoiceBatches:
        cfg = self.config
        images, face_labels = self._faces_info
        if not hasattr(self, "_facebank"):
            self._facebank = FaceBank(self.train_split, size=64, images=images)
        planner = BatchPlanner(
            self.bank.n_frames, cfg.batch_size, CropConfig(cfg.min_frames, cfg.max_frames), cfg.seed,
            rank=run.env.rank, world_size=run.env.world_size, sampling=cfg.sampling, groups=self.tset.labels,
            face_groups=face_labels, triplets=self.triplets,
        )
        return VoiceBatches(self.bank, planner, labels=self.tset.labels, faces=self._facebank)

    def setup(self, run: Run) -> None:
        cfg = self.config
        dev = run.device
        self.encoder = Frozen(self._encoder).to(dev)
        self.generator = Generator(self._encoder.embed_dim, cfg.generator_channels).to(dev)
        self.critic = FaceCritic(len(self.tset.names), cfg.trunk_channels).to(dev)
        self.modules = {"encoder": self.encoder, "generator": self.generator, "critic": self.critic}
        self.optimizers = {
            "generator": make_adam(self.generator.parameters(), cfg.lr, cfg.betas, cfg.weight_decay, dev),
            "critic": make_adam(self.critic.parameters(), cfg.lr, cfg.betas, cfg.weight_decay, dev),
        }
        self.g_net = run.wrap(self.generator)
        self.c_net = run.wrap(self.critic)
        self.teacher = self.student = self.kd = None
        if self._teacher is not None:
            self.teacher = Frozen(self._teacher).to(dev)
            self.modules["teacher"] = self.teacher
        self._gram = self._mean = self._basis = None
        if self.kind == "unsupervised":
            t = self._teacher
            b = t.net.backbone
            self.student = make_regressor(t.stats, cfg.student_width, cfg.student_last_channels, b.dropout.p,
                                          int(t.net.input_size or 120), "rgb").to(dev)
            self.kd = make_distillation(cfg.kd, self.student, t, n_data=len(self.bank), weight=cfg.kd_weight,
                                        crd_negatives=cfg.crd_negatives, seed=cfg.seed).to(dev)
            self.modules["student"] = self.student
            self.modules["kd"] = self.kd
            params = list(self.student.parameters()) + list(self.kd.parameters())
            self.optimizers["student"] = make_adam(params, cfg.lr, cfg.betas, cfg.weight_decay, dev)
            self.s_net = run.wrap(self.student)
            has_params = any(p.requires_grad for p in self.kd.parameters())
            self.kd_net = run.wrap(self.kd, broadcast_buffers=False) if (has_params and run.env.distributed) else self.kd
            self._std = self.student.param_std[12:].detach().clone()
            if cfg.mesh_weight > 0 or self.triplets:
                bfm = usable_bfm(cfg.bfm, self.dataset, run.log, topology=False)
                if bfm is None:
                    raise ValidationError("the mesh loss and the triplet need the morphable model: set V2M_BFM_DIR or "
                                          "--bfm, or --mesh-weight 0 and --triplet-weight 0", key="mesh_weight")
                self._n_vertices = int(bfm.n_vertices)
                if cfg.mesh_space == "neutral":
                    self._gram = torch.as_tensor(mesh_gram(bfm), dtype=torch.float32, device=dev)
                else:
                    self._mean = torch.as_tensor(np.asarray(bfm.mean, np.float32), device=dev)
                    self._basis = torch.as_tensor(np.concatenate([bfm.shape_basis, bfm.expression_basis], axis=1),
                                                  dtype=torch.float32, device=dev)
        elif cfg.triplet_weight > 0 or cfg.joint_generator:
            run.log("--kd none trains no student: the triplet and the joint generator do not apply")
        self._val = None
        self._bfm = None
        self._bfm_looked = False

    # -- one iteration
    def train_step(self, batch: dict, run: Run) -> dict:
        cfg = self.config
        x, real, label = batch["features"], batch["face"], batch["label"]
        if cfg.flip:
            rng = np.random.default_rng([cfg.seed, 0xF11B, run.iteration, run.env.rank])
            mask = torch.as_tensor(rng.random(real.shape[0]) < 0.5, device=real.device)
            real = torch.where(mask[:, None, None, None], real.flip(3), real)
        if self.triplets:  # anchors, positives, negatives through one forward pass
            x = torch.cat([x, batch["positive"], batch["negative"]], dim=0)
        with torch.no_grad():
            emb = self.encoder(x, normalize=True).float()
        b = real.shape[0]
        with run.autocast():
            faces = self.g_net(emb)
            fake = faces[:b]
            d_all, c_all = self.c_net(torch.cat([real, fake.detach()], dim=0))
        d_all, c_all = d_all.float(), c_all.float()
        ones = torch.ones(b, 1, device=real.device)
        zeros = torch.zeros(b, 1, device=real.device)
        loss_d = F.binary_cross_entropy_with_logits(d_all[:b], ones) + F.binary_cross_entropy_with_logits(d_all[b:], zeros)
        loss_c = F.cross_entropy(c_all[:b], label)
        run.optimize(loss_d + loss_c, "critic", self.optimizers["critic"])
        with run.autocast():
            d_fake, c_fake = self.c_net(fake)
        loss_gd = F.binary_cross_entropy_with_logits(d_fake.float(), ones)
        loss_gc = F.cross_entropy(c_fake.float(), label)
        loss_g = loss_gd + cfg.gan_weight * loss_gc
        out = {"loss_d": loss_d.detach(), "loss_c": loss_c.detach(), "loss_g": loss_gd.detach(), "loss_gc": loss_gc.detach(),
               "acc_real": (c_all[:b].detach().argmax(1) == label).float().mean()}
        if self.student is None:
            run.optimize(loss_g, "generator", self.optimizers["generator"])
            return out
        if self.joint:  # one backward: the student's loss reaches the generator too
            loss, logs = self.student_loss(batch, faces, run)
            run.optimize(loss_g + loss, "generator", [self.optimizers["generator"], self.optimizers["student"]])
        else:
            run.optimize(loss_g, "generator", self.optimizers["generator"])
            loss, logs = self.student_loss(batch, faces.detach(), run)
            run.optimize(loss, "student", self.optimizers["student"])
        out.update(logs)
        return out

    def student_loss(self, batch: dict, faces: torch.Tensor, run: Run):
        """The student's loss on generated faces (see the module docstring).

        Parameters
        ----------
        batch : dict
            The iteration's batch (``item`` for the CRD loss).
        faces : torch.Tensor, (B, 3, 64, 64), or (3B, 3, 64, 64) with triplets
            Generated faces of the anchors (then of the positives and the negatives); the
            gradient reaches the generator exactly when they are not detached.
        run : Run

        Returns
        -------
        loss : torch.Tensor, 0-d
        logs : dict of detached 0-d tensors
            ``loss_param``, ``loss_kd``, ``loss_student``, and ``loss_mesh``, ``loss_triplet``,
            ``triplet_ap``, ``triplet_an`` (mean distances) when those terms are on.
        """
        cfg = self.config
        b = batch["item"].shape[0]
        img = faces.float()
        with torch.no_grad():
            t_out = _float_out(self.teacher(img[:b], return_features=True))
        with run.autocast():
            s_all = _float_out(self.s_net(img, return_features=True))
        s_out = s_all if not self.triplets else {
            k: ([m[:b] for m in v] if isinstance(v, list) else (v[:b] if v is not None else None)) for k, v in s_all.items()}
        loss_p = ((s_out["params"] - t_out["params"]) ** 2).mean()
        loss = cfg.param_weight * loss_p
        logs = {}
        posed = cfg.mesh_space == "posed" and self._basis is not None
        s_vert = posed_vertices(s_all["pose"], s_all["coefficients"], self._mean, self._basis) if posed else None
        if cfg.mesh_weight > 0:
            if posed:
                t_vert = posed_vertices(t_out["pose"], t_out["coefficients"], self._mean, self._basis)
                loss_m = ((s_vert[:b] - t_vert) ** 2).mean()
            else:
                d = (s_out["params"][:, 12:] - t_out["params"][:, 12:]) * self._std
                loss_m = torch.einsum("bi,ij,bj->b", d, self._gram, d).mean()
            loss = loss + cfg.mesh_weight * loss_m
            logs["loss_mesh"] = loss_m.detach()
        if cfg.kd == "crd":
            ci = _contrast_index(batch["item"], len(self.bank), cfg.crd_negatives, cfg.seed, run.iteration)
            loss_k = self.kd_net(s_out, t_out, index=batch["item"], contrast_index=ci)
        else:
            loss_k = self.kd_net(s_out, t_out, index=batch["item"])
        loss = loss + loss_k
        if self.triplets:
            if posed:
                a, p, n = s_vert[:b], s_vert[b:2 * b], s_vert[2 * b:]
                d_ap, d_an = mesh_distance(a, p), mesh_distance(a, n)
            else:
                c = s_all["coefficients"]
                a, p, n = c[:b], c[b:2 * b], c[2 * b:]
                d_ap = mesh_distance(a, p, self._gram, self._n_vertices)
                d_an = mesh_distance(a, n, self._gram, self._n_vertices)
            loss_t = triplet_margin_loss(d_ap, d_an, cfg.triplet_margin)
            loss = loss + cfg.triplet_weight * loss_t
            logs.update(loss_triplet=loss_t.detach(), triplet_ap=d_ap.mean().detach(), triplet_an=d_an.mean().detach())
        logs.update(loss_param=loss_p.detach(), loss_kd=loss_k.detach(), loss_student=loss.detach())
        return loss, logs

    # -- validation
    def _val_data(self, run: Run):
        if self._val is None:
            self._val = ()
            ds = self.dataset
            if "test" in ds.splits and ds.references_path.is_file():
                refs = ds.references()
                if refs.shape is not None:
                    ts = ds.split("test")
                    names, utts, _ = select_test_utterances(ts, int(self.config.val_utterances), names=refs.identity.tolist())
                    if len(utts):
                        row = refs.index()
                        ref_rows = np.array([row[n] for n in names], np.int64)
                        ref_c = np.concatenate([refs.shape, refs.expression], axis=1).astype(np.float32)[ref_rows]
                        self._val = (names, whole_utterances(ts, utts), ref_c)
            if not self._val:
                run.log("no test references in the build: validation reports nothing")
        return self._val

    def validate(self, run: Run) -> dict:
        val = self._val_data(run)
        if not val or self.teacher is None:
            return {}
        names, feats, ref_c = val
        for m in self.modules.values():
            m.eval()
        student, teacher = self.student, self.teacher

        def fn(x, n):
            img = self.generator(self.encoder(x, n, normalize=True).float())
            t = teacher(img)
            parts = [t["coefficients"]]
            if student is not None:
                s = student(img)
                parts += [s["coefficients"], ((s["params"] - t["params"]) ** 2).mean(1, keepdim=True)]
            return torch.cat(parts, dim=1)

        y = embed_utterances(fn, feats, run.device, self.config.val_batch_size)
        out = {}
        if student is not None:
            out["val_kd_param"] = float(y[:, 100].mean())
        if not self._bfm_looked:
            self._bfm_looked = True
            self._bfm = usable_bfm(self.config.bfm, self.dataset, run.log)
        if self._bfm is not None:
            if student is not None:
                out.update(geometric_metrics(self._bfm, y[:, 50:100], ref_c, names))
            casc = geometric_metrics(self._bfm, y[:, :50], ref_c, names)
            out.update({f"{k}_cascade": v for k, v in casc.items() if not k.endswith("_meanface")})
        return out

    def state_dict(self) -> dict:
        cfg = self.config
        st = {
            "classes": list(self.tset.names),
            "encoder": {"channels": list(self._encoder.channels)},
            "generator": {"channels": list(cfg.generator_channels), "in_dim": int(self._encoder.embed_dim)},
            "critic": {"channels": list(cfg.trunk_channels), "n_ids": len(self.tset.names)},
            "kd": cfg.kd,
            "encoder_source": str(cfg.encoder),
            "teacher_source": str(cfg.teacher or ""),
            "recipe": {"name": cfg.recipe, "triplet_weight": float(cfg.triplet_weight),
                       "triplet_margin": float(cfg.triplet_margin), "joint_generator": bool(cfg.joint_generator),
                       "mesh_space": cfg.mesh_space, "param_weight": float(cfg.param_weight),
                       "mesh_weight": float(cfg.mesh_weight), "batch_size": int(cfg.batch_size)},
        }
        if self._teacher is not None:
            st["teacher"] = _teacher_arch(self._teacher)
        if self.student is not None:
            st["student"] = _teacher_arch(self.student)
        return st

    def load_state_dict(self, state: dict) -> None:
        self._check_classes(state)


def train_unsupervised(config: UnsupervisedConfig, out, *, resume: bool = False, log=None, dataset=None) -> FitResult:
    """Train the GAN and the distilled student; see :func:`v2m_models.training.fit`."""
    return fit(UnsupervisedTask(config, dataset=dataset), out, resume=resume, log=log)


# ------------------------------------------------------------------------------------- prediction
class VoiceFacePredictor:
    """Voice -> encoder -> generator (64x64 face) -> image -> 3DMM regressor -> BFM coefficients.

    Parameters
    ----------
    encoder : VoiceEncoder
    generator : Generator
    regressor : FaceRegressor
        The student (unsupervised model) or the teacher (cascade baseline).
    device : torch.device
    batch_size : int
        Whole utterances per forward pass.
    """

    def __init__(self, encoder, generator, regressor, device, batch_size: int = 16):
        self.encoder = encoder.to(device).eval()
        self.generator = generator.to(device).eval()
        self.regressor = regressor.to(device).eval()
        self.device = device
        self.batch_size = int(batch_size)

    def faces(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Generated faces (B, 3, 64, 64) in [-1, 1] of a padded batch (B, 64, T)."""
        return self.generator(self.encoder(x, lengths, normalize=True))

    def predict(self, features) -> dict:
        """Coefficients for whole utterances.

        Parameters
        ----------
        features : list of (64, T_i) float32 arrays

        Returns
        -------
        dict
            ``shape`` (N, 40) and ``expression`` (N, 10) float32, BFM units.
        """
        if not len(features):
            return {"shape": np.zeros((0, 40), np.float32), "expression": np.zeros((0, 10), np.float32)}
        c = embed_utterances(lambda x, n: self.regressor(self.faces(x, n))["coefficients"], list(features), self.device,
                             self.batch_size).astype(np.float32)
        return {"shape": c[:, :40], "expression": c[:, 40:]}


def _sub_state(state: dict, prefix: str = "module.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def load_generator(checkpoint: dict, path=None):
    """The frozen voice encoder and the generator of an ``unsupervised`` or ``gan`` checkpoint dict.

    Returns
    -------
    encoder : VoiceEncoder
    generator : Generator
    """
    where = None if path is None else str(path)
    if checkpoint.get("kind") not in ("unsupervised", "gan"):
        raise ValidationError(f"is a {checkpoint.get('kind')!r} checkpoint, not a generator (v2m-train unsupervised)",
                              path=where, key="kind")
    task = checkpoint.get("task", {})
    mods = checkpoint.get("modules", {})
    for k in ("encoder", "generator"):
        if k not in mods:
            raise ValidationError(f"the checkpoint has no {k!r} module", path=where, key=k)
    enc = VoiceEncoder(tuple(int(c) for c in task.get("encoder", {}).get("channels", VOICE_CHANNELS)))
    enc.load_state_dict(_sub_state(mods["encoder"]))
    g = task.get("generator", {})
    gen = Generator(int(g.get("in_dim", enc.embed_dim)), tuple(int(c) for c in g.get("channels", GENERATOR_CHANNELS)))
    gen.load_state_dict(mods["generator"])
    return enc.eval(), gen.eval()


def load_predictor(checkpoint: dict, device, batch_size: int = 16) -> VoiceFacePredictor:
    """A :class:`VoiceFacePredictor` (encoder -> generator -> student) from a loaded unsupervised checkpoint dict."""
    if checkpoint.get("kind") != "unsupervised" or "student" not in checkpoint.get("modules", {}):
        raise ValidationError("a GAN-only checkpoint has no student: predict with 'v2m-predict cascade --teacher ...'",
                              key="kind")
    enc, gen = load_generator(checkpoint)
    arch = checkpoint.get("task", {}).get("student", {})
    student = make_regressor(CoefficientStats.identity(62), float(arch.get("width_mult", 1.0)), arch.get("last_channels"),
                             0.2, int(arch.get("input_size", 120)), str(arch.get("input_format", "rgb")))
    student.load_state_dict(checkpoint["modules"]["student"])
    return VoiceFacePredictor(enc, gen, student, device, batch_size)
