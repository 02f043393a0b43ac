"""The image -> 3DMM teacher: a MobileNetV2 regressing 62 parameters from a face crop
(``v2m-train teacher``), and the loader every consumer of an image -> 3DMM network uses.

The public pretrained teachers of the paper (3DDFA-V2, SynergyNet) can no longer be downloaded,
so the teacher is trained on the build's own (face crop, fitted parameters) pairs: every
training-split image with a finite, converged landmark fit (optionally only fits with
``residual_normalized <= max_residual``) gives one RGB face crop (120x120 by default; 64x64
crops upsampled to 120x120 with ``face_size=64``) and its 62 targets in the 3DDFA layout
(:func:`crop_pose`, in the pixels of the network's 120x120 input):

- ``[0:12]`` pose, a 3x4 matrix ``[s R | t]`` (row-major) in the pixels of the crop;
- ``[12:52]`` the 40 shape and ``[52:62]`` the 10 expression coefficients (BFM units).

The network regresses the targets normalised by their training-set mean and standard deviation
(:class:`v2m_models.data.CoefficientStats` over the 62 entries, saved in the checkpoint); the loss
is the mean squared error of the normalised parameters (pose entries weighted by
``pose_weight``). Inputs are RGB crops scaled to [-1, 1], no augmentation (a horizontal flip
would mirror the face shape, which the coefficients cannot express). Adam, lr 1e-3.

Validation (the build's test split): ``val_loss``, the normalised squared error on up to
``val_images`` test images (a fixed sample), and, when the morphable model can be found, ER,
ARE_mean and NME (official) of the teacher run on each test reference's own source image against
that reference (macro-averaged, with the mean face's values ``*_meanface`` beside them): how well
the teacher reproduces the fitting.

:class:`FaceRegressor` is the network plus its parameter statistics (as buffers), returning
normalised parameters and de-normalised coefficients; the unsupervised student is the same class.
:func:`load_teacher` reads a ``teacher`` checkpoint, or a plain ``torch.save``\\ d state dict of
the same architecture (:class:`v2m_models.nets.ImageTo3DMM` or :class:`v2m_models.nets.MobileNetV2`
keys, 62 outputs), whose outputs are then de-whitened with the morphable model's 3DDFA
``param_whitening`` statistics.

Checkpoint ``task`` entries (kind ``"teacher"``): ``stats`` (62 means and stds), ``net``
(``width_mult``, ``last_channels``, ``dropout``, ``input_size``), ``input_format``, ``n_images``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from v2m_bench.errors import ValidationError

from .data import BatchPlanner, CoefficientStats, CropConfig, FaceBank
from .nets import ImageTo3DMM, MobileNetV2
from .supervised import usable_bfm
from .training import FitResult, Run, Task, TrainConfig, fit, load_checkpoint, make_adam

__all__ = [
    "N_PARAMS",
    "TeacherConfig",
    "TeacherTask",
    "FaceRegressor",
    "crop_pose",
    "teacher_pairs",
    "param_stats",
    "make_regressor",
    "load_teacher",
    "train_teacher",
    "reference_images",
]

#: 12 pose + 40 shape + 10 expression (3DDFA layout).
N_PARAMS = 62


# ------------------------------------------------------------------------------------- config
@dataclass
class TeacherConfig(TrainConfig):
    """:class:`~v2m_models.training.TrainConfig` plus the teacher options.

    Attributes
    ----------
    lr : float
        1e-3.
    iterations : int
        20,000 (about 24 epochs of the ~107K VoxCeleb-3D training images at batch 128).
    width_mult : float
        MobileNetV2 width multiplier (1.0).
    last_channels : int, optional
        Width of the last 1x1 conv (default 1280; smaller for tests).
    dropout : float
        Before the linear layer (0.2).
    face_size : int
        Stored crop size read from the build (120; the build must have stored it).
    input_size : int
        Network input size (120, as 3DDFA); crops of another size are bilinearly resized to it.
        ``face_size=64`` trains the teacher on 64x64 crops upsampled to 120x120, the same
        resampling the unsupervised model applies to its generated 64x64 faces.
    max_residual : float
        Keep fits with ``residual_normalized`` at most this (0: every converged, finite fit).
    pose_weight : float
        Loss weight of the 12 pose entries (shape and expression: 1).
    val_images : int
        Test images (a fixed random sample) for ``val_loss``.
    """

    lr: float = 1e-3
    iterations: int = 20_000
    width_mult: float = 1.0
    last_channels: int | None = None
    dropout: float = 0.2
    face_size: int = 120
    input_size: int = 120
    max_residual: float = 0.0
    pose_weight: float = 1.0
    val_images: int = 512

    def __post_init__(self):
        super().__post_init__()
        if not float(self.width_mult) > 0:
            raise ValidationError(f"must be positive, got {self.width_mult}", key="width_mult")
        if self.last_channels is not None and int(self.last_channels) < 1:
            raise ValidationError(f"must be positive, got {self.last_channels}", key="last_channels")
        if not 0 <= float(self.dropout) < 1:
            raise ValidationError(f"must lie in [0, 1), got {self.dropout}", key="dropout")
        for k in ("face_size", "input_size"):
            if int(getattr(self, k)) < 32:
                raise ValidationError(f"must be >= 32, got {getattr(self, k)}", key=k)
        if not float(self.max_residual) >= 0 or not float(self.pose_weight) >= 0:
            raise ValidationError("max_residual and pose_weight must be >= 0", key="max_residual/pose_weight")


# ------------------------------------------------------------------------------------- targets
def crop_pose(scale, rotation, translation, crop_box, size: int) -> np.ndarray:
    """The fitted camera of each image in the pixels of its square face crop, as 3DDFA's 12 pose entries.

    The fit projects a BFM point ``X`` to image pixels ``u = s (R X)_x + t_x``,
    ``v = t_y - s (R X)_y`` (:func:`v2m_data.fitting.project`). The crop is the square of side
    ``max(w, h)`` centred on ``crop_box`` resized to ``size`` pixels (:func:`v2m_data.images.crop_face`;
    exact to the half pixel the crop's corner is rounded by), so in crop pixels
    ``s' = s k``, ``t' = (t - corner) k`` with ``k = size / side``. The returned matrix is
    ``P = [s' R | (t'_x, size - t'_y, 0)]``: rows 0 and 1 give the crop position with x to the
    right and y *up from the bottom edge* (3DDFA's convention before its final flip).

    Parameters
    ----------
    scale : (M,) float
        Pixels per BFM unit.
    rotation : (M, 3, 3) float
    translation : (M, 2) float
        Pixels (x right, y down).
    crop_box : (M, 4) float
        ``(left, top, right, bottom)`` pixels.
    size : int
        Crop side in pixels.

    Returns
    -------
    ndarray, (M, 12) float64
        Row-major 3x4 matrices.
    """
    s = np.asarray(scale, np.float64).reshape(-1)
    r = np.asarray(rotation, np.float64).reshape(-1, 3, 3)
    t = np.asarray(translation, np.float64).reshape(-1, 2)
    b = np.asarray(crop_box, np.float64).reshape(-1, 4)
    side = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        k = float(size) / side
    x0 = (b[:, 0] + b[:, 2]) / 2 - side / 2
    y0 = (b[:, 1] + b[:, 3]) / 2 - side / 2
    p = np.zeros((len(s), 3, 4))
    p[:, :, :3] = (s * k)[:, None, None] * r
    p[:, 0, 3] = (t[:, 0] - x0) * k
    p[:, 1, 3] = float(size) - (t[:, 1] - y0) * k
    return p.reshape(-1, 12)


def teacher_pairs(split, size: int = 120, max_residual: float = 0.0):
    """The (image, 62 parameters) training pairs of a split.

    Parameters
    ----------
    split : v2m_data.shards.SplitData
    size : int
        Crop size the pose is expressed in.
    max_residual : float
        Keep fits with ``residual_normalized <= max_residual`` (0: no limit).

    Returns
    -------
    images : (M,) int64
        Image numbers of ``split`` with a converged, finite fit.
    params : (M, 62) float32
        Pose (:func:`crop_pose`), shape, expression.
    """
    if split.n_images == 0:
        return np.zeros(0, np.int64), np.zeros((0, N_PARAMS), np.float32)
    f = split.fit
    pose = crop_pose(f["scale"], f["rotation"], f["translation"], split.images["crop_box"], size)
    params = np.concatenate([pose, np.asarray(f["shape"], np.float64), np.asarray(f["expression"], np.float64)], axis=1)
    ok = np.isfinite(params).all(axis=1) & np.asarray(f["converged"], bool)
    if float(max_residual) > 0:
        with np.errstate(invalid="ignore"):
            ok &= np.asarray(f["residual_normalized"], np.float64) <= float(max_residual)
    idx = np.flatnonzero(ok).astype(np.int64)
    return idx, params[idx].astype(np.float32)


def param_stats(params: np.ndarray) -> CoefficientStats:
    """Per-entry mean and standard deviation of (M, 62) parameters, each std floored on its own scale.

    Entries span many magnitudes (rotation entries ~1e-3 px per BFM unit, shape coefficients
    ~1e5), so unlike :meth:`CoefficientStats.fit` the floor is per entry: ``1e-6 |mean|``, and 1 for
    a constant zero entry (the third row's translation).
    """
    p = np.asarray(params, np.float64)
    if len(p) < 2:
        raise ValidationError(f"need at least two parameter rows, got {len(p)}", key="params")
    mean = p.mean(axis=0)
    std = np.maximum(p.std(axis=0), 1e-6 * np.abs(mean))
    std = np.where(std > 0, std, 1.0)
    return CoefficientStats(tuple(float(x) for x in mean), tuple(float(x) for x in std))


def reference_images(dataset):
    """Test-split image of each reference: its ``source_image``, or for a reference made from
    several images (an identity label: ``source_image`` lists them, ``;``-separated) the first of
    them found in the test split.

    Returns
    -------
    names : list of str
        Reference identities whose source image is in the test split.
    images : (R,) int64
        Their image numbers in the test split.
    ref_rows : (R,) int64
        Their rows in references.h5.
    refs : v2m_bench.formats.References or None
    """
    empty = ([], np.zeros(0, np.int64), np.zeros(0, np.int64), None)
    if "test" not in dataset.splits or not dataset.references_path.is_file():
        return empty
    refs = dataset.references()
    if refs.shape is None or refs.source_image is None:
        return empty
    ts = dataset.split("test")
    if ts.n_images == 0:
        return empty
    names_all = np.asarray([str(x) for x in ts.identities["name"]], dtype=object)
    img_name = names_all[ts.images["identity"].astype(np.int64)]
    by_path = {str(p): i for i, p in enumerate(ts.images["path"])}
    by_id = {(str(n), str(k)): i for i, (n, k) in enumerate(zip(img_name, ts.images["image_id"]))}
    names, images, rows = [], [], []
    for r, (name, sources) in enumerate(zip(refs.identity, refs.source_image)):
        i = None
        for src in str(sources).split(";"):
            i = by_path.get(src, by_id.get((str(name), Path(src).stem)))
            if i is not None:
                break
        if i is not None:
            names.append(str(name))
            images.append(i)
            rows.append(r)
    return names, np.asarray(images, np.int64), np.asarray(rows, np.int64), refs


# ------------------------------------------------------------------------------------- the network
class FaceRegressor(nn.Module):
    """Image -> 3DMM network with its parameter statistics.

    Parameters
    ----------
    net : v2m_models.nets.ImageTo3DMM
    stats : CoefficientStats
        62 means and standard deviations (crop pixels / BFM units) of the parameters the network
        regresses in normalised form; kept as the buffers ``param_mean`` and ``param_std``.
    input_format : {"rgb", "bgr"}
        What the network was trained on: ``rgb`` images in [-1, 1] (this project), or ``bgr``
        (3DDFA: BGR, ``(x - 127.5) / 128``). :meth:`forward` always takes RGB in [-1, 1].
    """

    def __init__(self, net, stats: CoefficientStats, input_format: str = "rgb"):
        super().__init__()
        if input_format not in ("rgb", "bgr"):
            raise ValidationError(f"must be rgb or bgr, got {input_format!r}", key="input_format")
        if len(stats.mean) != N_PARAMS:
            raise ValidationError(f"need {N_PARAMS} parameter statistics, got {len(stats.mean)}", key="stats")
        self.net = net
        self.input_format = input_format
        self.register_buffer("param_mean", torch.tensor(stats.mean, dtype=torch.float32))
        self.register_buffer("param_std", torch.tensor(stats.std, dtype=torch.float32))

    @property
    def stats(self) -> CoefficientStats:
        """The 62 parameter statistics."""
        return CoefficientStats(tuple(float(x) for x in self.param_mean.cpu()), tuple(float(x) for x in self.param_std.cpu()))

    def forward(self, images: torch.Tensor, return_features: bool = False) -> dict:
        """Predict parameters.

        Parameters
        ----------
        images : torch.Tensor, (B, 3, H, W) float
            RGB faces in [-1, 1]; bilinearly resized to the network's input size (64x64 GAN faces
            are upsampled to 120x120).
        return_features : bool
            Also return ``features``, ``early`` and ``maps`` (:meth:`v2m_models.nets.MobileNetV2.forward`).

        Returns
        -------
        dict
            ``params`` (B, 62) normalised parameters; ``coefficients`` (B, 50) float32, the 40
            shape and 10 expression coefficients de-normalised (BFM units); ``pose`` (B, 12)
            de-normalised; the feature entries on request.
        """
        if self.input_format == "bgr":
            images = images.flip(1) * (127.5 / 128.0)
        out = self.net(images, return_features=return_features)
        raw = out["params"].float() * self.param_std + self.param_mean
        keep = {k: v for k, v in out.items() if k not in ("pose", "shape", "expression")}
        keep["coefficients"] = raw[:, 12:]
        keep["pose"] = raw[:, :12]
        return keep


def make_regressor(stats: CoefficientStats, width_mult: float = 1.0, last_channels=None, dropout: float = 0.2,
                   input_size: int = 120, input_format: str = "rgb") -> FaceRegressor:
    """A new MobileNetV2 :class:`FaceRegressor` (62 outputs, ``input_size`` x ``input_size`` input)."""
    net = ImageTo3DMM(MobileNetV2(N_PARAMS, width_mult=width_mult, dropout=dropout, last_channels=last_channels),
                      input_size=input_size)
    return FaceRegressor(net, stats, input_format)


def _state_dict_architecture(state: dict, path) -> dict:
    """MobileNetV2 keyword arguments matching a state dict (``backbone.``/``module.`` prefixes removed)."""
    from .nets import make_divisible

    w = state.get("features.0.0.weight")
    c = state.get("classifier.weight")
    if w is None or c is None or w.dim() != 4 or c.dim() != 2:
        raise ValidationError("not a MobileNetV2 image->3DMM state dict (no features.0.0.weight / classifier.weight)",
                              path=str(path))
    if int(c.shape[0]) != N_PARAMS:
        raise ValidationError(f"the network has {int(c.shape[0])} outputs, not {N_PARAMS} (12 pose + 40 + 10)",
                              path=str(path), key="classifier.weight")
    stem = int(w.shape[0])
    width = stem / 32.0
    if make_divisible(32 * width) != stem:  # pragma: no cover - every stem width maps back
        raise ValidationError(f"cannot infer the width from a stem of {stem} channels", path=str(path))
    return {"width_mult": width, "last_channels": int(c.shape[1])}


def _strip(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        for pre in ("module.", "backbone.", "net.backbone."):
            if k.startswith(pre):
                k = k[len(pre):]
        out[k] = v
    return out


def load_teacher(path, map_location="cpu", *, bfm=None, input_format: str = "rgb", input_size: int = 120):
    """Load an image -> 3DMM network: a ``teacher`` checkpoint or a plain state dict of the same architecture.

    Parameters
    ----------
    path : path
        ``v2m-train teacher`` checkpoint, or a ``torch.save``\\ d state dict (optionally under a
        ``state_dict`` or ``model`` key) of :class:`v2m_models.nets.MobileNetV2` /
        :class:`v2m_models.nets.ImageTo3DMM` with 62 outputs, any width.
    map_location : str or torch.device
    bfm : path, optional
        Morphable model whose 3DDFA ``param_whitening`` statistics de-whiten a plain state dict's
        outputs (default ``$V2M_BFM_DIR`` / the cache). Unused for checkpoints.
    input_format : {"rgb", "bgr"}
        Input convention of a plain state dict (``bgr``: 3DDFA's). Checkpoints record theirs.
    input_size : int
        Input size of a plain state dict's network (120).

    Returns
    -------
    regressor : FaceRegressor
        In eval mode, on ``map_location``.
    info : dict
        ``source`` (the path), ``kind`` (``teacher`` or ``state_dict``), ``iteration`` (or -1).

    Raises
    ------
    ValidationError
        Missing or unreadable file, a checkpoint of another kind, or another architecture.
    """
    from .training import CHECKPOINT_FORMAT

    path = Path(path)
    if not path.is_file():
        raise ValidationError("no such teacher checkpoint", path=str(path))
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ValidationError(f"cannot read the teacher: {' '.join(str(e).split())[:200]}", path=str(path)) from None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        ck = load_checkpoint(path, map_location)
        if ck["kind"] != "teacher":
            raise ValidationError(f"is a {ck['kind']!r} checkpoint, not a teacher (v2m-train teacher)", path=str(path))
        task = ck.get("task", {})
        if "stats" not in task or "model" not in ck["modules"]:
            raise ValidationError("teacher checkpoint without statistics or model", path=str(path), key="task.stats")
        net = task.get("net", {})
        reg = make_regressor(CoefficientStats.from_dict(task["stats"]), float(net.get("width_mult", 1.0)),
                             net.get("last_channels"), float(net.get("dropout", 0.2)), int(net.get("input_size", 120)),
                             str(task.get("input_format", "rgb")))
        _load_strict(reg, ck["modules"]["model"], path)
        info = {"source": str(path), "kind": "teacher", "iteration": int(ck["iteration"])}
    else:
        state = obj
        if isinstance(state, dict):
            for k in ("state_dict", "model"):
                if isinstance(state.get(k), dict):
                    state = state[k]
                    break
        if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValidationError("neither a voice2mesh checkpoint nor a state dict of tensors", path=str(path))
        state = _strip(state)
        arch = _state_dict_architecture(state, path)
        # the weights must fit the architecture before the BFM is looked for (its statistics)
        neutral = CoefficientStats(tuple([0.0] * 62), tuple([1.0] * 62))
        _load_strict(make_regressor(neutral, arch["width_mult"], arch["last_channels"], 0.2, input_size,
                                    input_format).net.backbone, state, path)
        from v2m_bench.bfm import load_bfm

        m = load_bfm(bfm)
        stats = CoefficientStats(
            tuple(float(x) for x in np.concatenate([m.pose_mean, m.shape_mean, m.expression_mean])),
            tuple(float(x) for x in np.concatenate([m.pose_std, m.shape_std, m.expression_std])),
        )
        reg = make_regressor(stats, arch["width_mult"], arch["last_channels"], 0.2, input_size, input_format)
        _load_strict(reg.net.backbone, state, path)
        info = {"source": str(path), "kind": "state_dict", "iteration": -1}
    return reg.to(map_location).eval(), info


def _load_strict(module, state: dict, path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = " ".join(str(e).split())
        raise ValidationError(f"not the same architecture: {first[:240]}", path=str(path)) from None


# ------------------------------------------------------------------------------------- the trainer
class TeacherTask(Task):
    """Regress the 62 normalised parameters from the build's face crops (see the module docstring)."""

    kind = "teacher"
    predictor = ""

    def __init__(self, config: TeacherConfig, *, dataset=None):
        super().__init__(config)
        from v2m_data.shards import open_dataset

        if not config.data:
            raise ValidationError("no build folder given", key="data")
        self.dataset = dataset if dataset is not None else open_dataset(config.data)
        if "train" not in self.dataset.splits:
            raise ValidationError("the build has no training split", path=str(config.data))
        self.train_split = self.dataset.split("train")
        self.images, params = teacher_pairs(self.train_split, config.input_size, config.max_residual)
        if len(self.images) < 2:
            raise ValidationError(f"the build has {len(self.images)} training images with a usable fit; need 2",
                                  path=str(config.data))
        self.stats = param_stats(params)
        self.targets = self.stats.normalise(params).astype(np.float32)
        self.faces = FaceBank(self.train_split, size=int(config.face_size), images=self.images)

    def setup(self, run: Run) -> None:
        cfg = self.config
        model = make_regressor(self.stats, cfg.width_mult, cfg.last_channels, cfg.dropout, cfg.input_size).to(run.device)
        self.modules = {"model": model}
        self.optimizers = {"model": make_adam(model.parameters(), cfg.lr, cfg.betas, cfg.weight_decay, run.device)}
        self.net = run.wrap(model.net)
        w = torch.ones(N_PARAMS, device=run.device)
        w[:12] = float(cfg.pose_weight)
        self._w = w / w.mean()
        self._val = None
        self._bfm = None
        self._bfm_looked = False

    def _planner(self, run: Run) -> BatchPlanner:
        return BatchPlanner(np.ones(len(self.faces), np.int64), self.config.batch_size, CropConfig(1, 1), self.config.seed,
                            rank=run.env.rank, world_size=run.env.world_size)

    def batches(self, run: Run, start: int, stop: int):
        planner = self._planner(run)
        if self.config.loader == "gpu":
            crops = torch.as_tensor(self.faces.crops, device=run.device)
            targets = torch.as_tensor(self.targets, device=run.device)

            def gen_gpu():
                for i in range(start, stop):
                    items = torch.as_tensor(planner.items_of(i), device=run.device)
                    x = crops[items].permute(0, 3, 1, 2).float() / 127.5 - 1.0
                    yield {"image": x, "target": targets[items], "item": items}

            return gen_gpu()

        def gen():
            for i in range(start, stop):
                items = planner.items_of(i)
                yield {
                    "image": torch.from_numpy(self.faces.batch(items)).to(run.device, non_blocking=True),
                    "target": torch.from_numpy(self.targets[items]).to(run.device, non_blocking=True),
                    "item": torch.from_numpy(items).to(run.device),
                }

        return gen()

    def train_step(self, batch: dict, run: Run) -> dict:
        with run.autocast():
            pred = self.net(batch["image"])["params"]
        sq = (pred.float() - batch["target"]) ** 2
        loss = (sq * self._w).mean()
        run.optimize(loss, "model", self.optimizers["model"])
        sq = sq.detach()
        return {"loss": loss.detach(), "loss_pose": sq[:, :12].mean(), "loss_shape": sq[:, 12:52].mean(),
                "loss_expression": sq[:, 52:].mean()}

    def _val_data(self, run: Run):
        if self._val is None:
            ds = self.dataset
            cfg = self.config
            val = {}
            if "test" in ds.splits:
                ts = ds.split("test")
                imgs, params = teacher_pairs(ts, cfg.input_size, 0.0)
                if len(imgs):
                    rng = np.random.default_rng([cfg.seed, 0x7EAC])
                    k = min(int(cfg.val_images), len(imgs))
                    pick = np.sort(rng.choice(len(imgs), size=k, replace=False))
                    if k:
                        val["loss"] = (FaceBank(ts, cfg.face_size, imgs[pick]).batch(np.arange(k)),
                                       self.stats.normalise(params[pick]).astype(np.float32))
                names, ref_imgs, ref_rows, refs = reference_images(ds)
                if len(ref_imgs):
                    ref_c = np.concatenate([refs.shape, refs.expression], axis=1).astype(np.float32)[ref_rows]
                    val["refs"] = (names, FaceBank(ts, cfg.face_size, ref_imgs).batch(np.arange(len(ref_imgs))), ref_c)
            if not val:
                run.log("no test images in the build: validation reports nothing")
            self._val = val
        return self._val

    def validate(self, run: Run) -> dict:
        val = self._val_data(run)
        if not val:
            return {}
        model = self.modules["model"]
        model.eval()
        out = {}
        if "loss" in val:
            x, t = val["loss"]
            z = _run_images(model, x, run.device, self.config.val_batch_size, "params")
            out["val_loss"] = float(np.mean((z - t) ** 2))
        if "refs" in val:
            if not self._bfm_looked:
                self._bfm_looked = True
                self._bfm = usable_bfm(self.config.bfm, self.dataset, run.log)
            if self._bfm is not None:
                from .supervised import geometric_metrics

                names, x, ref_c = val["refs"]
                c = _run_images(model, x, run.device, self.config.val_batch_size, "coefficients")
                out.update(geometric_metrics(self._bfm, c, ref_c, names))
        return out

    def state_dict(self) -> dict:
        cfg = self.config
        return {
            "stats": self.stats.to_dict(),
            "net": {"width_mult": float(cfg.width_mult), "last_channels": cfg.last_channels, "dropout": float(cfg.dropout),
                    "input_size": int(cfg.input_size), "face_size": int(cfg.face_size)},
            "input_format": "rgb",
            "n_images": int(len(self.images)),
        }

    def load_state_dict(self, state: dict) -> None:
        if "n_images" in state and int(state["n_images"]) != len(self.images):
            raise ValidationError(f"the build has {len(self.images)} usable training images, the checkpoint "
                                  f"was trained on {state['n_images']}", key="data")

    def samples_per_iteration(self) -> int:
        return int(self.config.batch_size)


def _run_images(model, images: np.ndarray, device, batch_size: int, key: str) -> np.ndarray:
    """``model(images)[key]`` in eval mode, batched; images (N, 3, S, S) float32 in [-1, 1]."""
    outs = []
    with torch.no_grad():
        for s in range(0, len(images), int(batch_size)):
            x = torch.from_numpy(images[s:s + int(batch_size)]).to(device)
            outs.append(model(x)[key].float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def train_teacher(config: TeacherConfig, out, *, resume: bool = False, log=None, dataset=None) -> FitResult:
    """Train the image -> 3DMM teacher; see :func:`v2m_models.training.fit`."""
    return fit(TeacherTask(config, dataset=dataset), out, resume=resume, log=log)
