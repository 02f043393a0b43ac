"""The voice-encoder (speaker classification) and supervised (voice -> 3DMM) trainers, and the
supervised predictor.

``train_voice_encoder`` / ``train_supervised`` (``v2m-train voice-encoder`` / ``v2m-train supervised``)
run a :class:`VoiceEncoderTask` / :class:`SupervisedTask` with :func:`v2m_models.training.fit`.

Voice encoder
    :class:`~v2m_models.nets.SpeakerClassifier` over the training identities (cross-entropy on
    random 3-8 s crops). Validation: accuracy on whole training utterances (a fixed sample) and
    nearest-centroid identification among the *test* identities from the L2-normalised
    embeddings (leave-one-out; chance = 1 / number of test identities), which measures how well
    the embedding generalises to unseen speakers.

Supervised
    :class:`~v2m_models.nets.SupervisedModel` (encoder -> linear shape and expression heads),
    optionally starting from a voice-encoder checkpoint (``encoder``) and keeping it fixed
    (``freeze_encoder``). Loss: mean squared error on the target coefficients normalised by the
    training-set statistics (:class:`v2m_models.data.CoefficientStats`), expression terms
    weighted by ``expression_weight``. Targets: :func:`v2m_models.data.identity_targets`.
    Validation on the build's test references: the benchmark's three utterances per identity
    (:func:`v2m_models.data.select_test_utterances`), whole, de-normalised; ``val_loss`` (the
    normalised squared error against the reference coefficients) and, when the BFM can be
    found, ER, ARE_mean and NME (official) macro-averaged over identities, with the mean face's
    values (``*_meanface``) beside them.

Checkpoint ``task`` entries (kind ``"supervised"``): ``stats`` (coefficient mean/std),
``classes`` (training identity names), ``n_fits``, ``shuffled``, ``shuffle_mode`` (``""`` when not
shuffled), ``target_rule``, ``encoder`` (``channels``, ``normalize_embedding``), ``n_shape``, ``n_exp``,
``encoder_source``.
:func:`load_predictor` turns such a checkpoint into a :class:`SupervisedPredictor`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from v2m_bench.errors import BFMNotFoundError, V2MError, ValidationError

from .data import (
    CoefficientStats,
    CropConfig,
    DeviceVoiceBatches,
    FeatureBank,
    BatchPlanner,
    TargetRule,
    VoiceBatches,
    make_loader,
    pad_batch,
    select_test_utterances,
    training_set,
    whole_utterances,
)
from .nets import VOICE_CHANNELS, SpeakerClassifier, SupervisedModel, VoiceEncoder
from .training import FitResult, Run, Task, TrainConfig, fit, load_checkpoint, make_adam

__all__ = [
    "VoiceEncoderConfig",
    "SupervisedConfig",
    "VoiceEncoderTask",
    "SupervisedTask",
    "SupervisedPredictor",
    "train_voice_encoder",
    "train_supervised",
    "load_predictor",
    "load_encoder",
    "embed_utterances",
    "find_bfm",
    "usable_bfm",
    "SHUFFLE_MODES",
]


#: How ``SupervisedConfig.shuffle_pairs`` breaks the voice/target pairing.
SHUFFLE_MODES = ("fixed", "iteration")


# ------------------------------------------------------------------------------------- configs
@dataclass
class VoiceEncoderConfig(TrainConfig):
    """:class:`~v2m_models.training.TrainConfig` plus the voice-encoder options.

    Attributes
    ----------
    lr : float
        1e-3 (the speaker-classification recipe is not in the paper; Adam 1e-3 trains it well).
    encoder_channels : tuple of int
        Widths of the voice encoder (:data:`v2m_models.nets.VOICE_CHANNELS`; smaller for tests).
    val_train_utterances : int
        Training utterances (a fixed random sample) whose whole-utterance accuracy is reported.
    val_test_utterances : int
        Utterances per test identity used for nearest-centroid identification.
    """

    lr: float = 1e-3
    encoder_channels: tuple = VOICE_CHANNELS
    val_train_utterances: int = 256
    val_test_utterances: int = 5

    def __post_init__(self):
        super().__post_init__()
        self.encoder_channels = tuple(int(c) for c in self.encoder_channels)


@dataclass
class SupervisedConfig(TrainConfig):
    """:class:`~v2m_models.training.TrainConfig` plus the supervised options (paper defaults:
    Adam 2e-4, batch 128, 50K iterations).

    Attributes
    ----------
    encoder : str, optional
        Voice-encoder (or supervised) checkpoint to start the encoder from.
    freeze_encoder : bool
        Train only the heads.
    encoder_channels : tuple of int
        Widths of a new encoder (taken from ``encoder`` when given).
    normalize_embedding : bool
        Heads see the L2-normalised embedding (as the released model).
    target : {"median", "reference"}
        :class:`v2m_models.data.TargetRule` method.
    target_fallback : bool
        Identities without frontal well-fitted images use all their valid fits.
    targets : {"image", "identity"}
        ``image``: targets made from the per-image fits (``target``; the paper's labels);
        ``identity``: the identity labels stored in the build (:mod:`v2m_data.labels`).
    shuffle_pairs : bool
        Control experiment: break the pairing of training voices and target coefficients (the
        voices then carry no information about the targets; a model that still beats the mean
        face owes it to something other than the voice). How: ``shuffle_mode``.
    shuffle_mode : {"fixed", "iteration"}
        With ``shuffle_pairs``: ``"fixed"`` permutes the identity -> target mapping once (seeded by
        ``seed``), so each voice keeps one wrong target for the whole run; ``"iteration"`` draws a
        fresh permutation every iteration (seeded by ``(seed, iteration)``, so resuming is exact),
        so no voice keeps any target and the best the model can do is the training-set mean. A
        fixed permutation of few identities leaves a chance correlation between the voices and
        their (wrong) targets (e.g. of gender: about ``1 / sqrt(identities)``), which a model
        learns and carries to the test set; re-drawing removes it.
    expression_weight : float
        Weight of the expression coefficients in the loss (shape: 1).
    val_utterances : int
        Utterances per test identity in validation (3, as the benchmark).
    """

    encoder: str | None = None
    freeze_encoder: bool = False
    encoder_channels: tuple = VOICE_CHANNELS
    normalize_embedding: bool = True
    target: str = "median"
    target_fallback: bool = False
    targets: str = "image"
    shuffle_pairs: bool = False
    shuffle_mode: str = "fixed"
    expression_weight: float = 1.0
    val_utterances: int = 3

    def __post_init__(self):
        super().__post_init__()
        self.encoder_channels = tuple(int(c) for c in self.encoder_channels)
        TargetRule(method=self.target, source=self.targets)  # validates
        if self.freeze_encoder and not self.encoder:
            raise ValidationError("freezing the encoder needs --encoder (a trained one)", key="freeze_encoder")
        if self.shuffle_mode not in SHUFFLE_MODES:
            raise ValidationError(f"must be one of {', '.join(SHUFFLE_MODES)}, got {self.shuffle_mode!r}", key="shuffle_mode")
        if not (self.expression_weight >= 0):
            raise ValidationError(f"must be >= 0, got {self.expression_weight}", key="expression_weight")


# ------------------------------------------------------------------------------------- helpers
def find_bfm(config_bfm=None, dataset=None, log=None):
    """The BFM for geometric validation: ``config_bfm``, else ``$V2M_BFM_DIR``/the cache, else the
    build's (manifest ``inputs.bfm``); None when none can be loaded."""
    from v2m_bench.bfm import load_bfm

    tries = [config_bfm] if config_bfm else [None]
    man = getattr(dataset, "manifest", None) or {}
    b = (man.get("inputs") or {}).get("bfm")
    if b and not config_bfm:
        tries.append(b)
    for t in tries:
        try:
            return load_bfm(t)
        except (BFMNotFoundError, V2MError, OSError):
            continue
    if log is not None:
        log("no BFM found (set V2M_BFM_DIR or --bfm): validation reports no geometric metrics")
    return None


def usable_bfm(config_bfm=None, dataset=None, log=None, *, topology: bool = True):
    """The BFM found by :func:`find_bfm` if it can serve, else None, with the reason logged.

    Every use needs 40 shape and 10 expression coefficients. With ``topology`` (validation
    metrics: ARE, NME and the ICP RMSE read fixed vertex ids of the 53,215-vertex BFM) the mesh
    must be the BFM's too, so a model of another mesh, such as a small test model a build was
    made with, gives None and validation reports no geometric metrics. Without it (the mesh loss,
    which only needs the basis' Gram matrix) any 40 + 10 model serves.
    """
    from v2m_bench.bfm import N_VERTICES

    b = find_bfm(config_bfm, dataset, log)
    if b is None:
        return None
    if b.n_shape != 40 or b.n_expression != 10 or (topology and b.n_vertices != N_VERTICES):
        if log is not None:
            want = f"the BFM's {N_VERTICES} vertices and 40 + 10" if topology else "40 + 10 coefficients"
            log(f"the model has {b.n_vertices} vertices and {b.n_shape} + {b.n_expression} coefficients, "
                f"not {want}: no geometric metrics" if topology else
                f"the model has {b.n_shape} + {b.n_expression} coefficients, not {want}")
        return None
    return b


def load_encoder(path, map_location="cpu") -> tuple[VoiceEncoder, dict]:
    """The voice encoder of a voice-encoder or supervised checkpoint.

    Returns
    -------
    encoder : VoiceEncoder
    checkpoint : dict
    """
    ck = load_checkpoint(path, map_location)
    state = ck["modules"].get("model")
    if state is None:
        raise ValidationError("the checkpoint has no 'model' module", path=str(path))
    enc_state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    if not enc_state:
        raise ValidationError(f"a {ck['kind']!r} checkpoint holds no voice encoder", path=str(path))
    channels = ck.get("task", {}).get("encoder", {}).get("channels") or ck["config"].get("encoder_channels") or VOICE_CHANNELS
    enc = VoiceEncoder(tuple(int(c) for c in channels))
    enc.load_state_dict(enc_state)
    return enc, ck


def embed_utterances(fn, features, device, batch_size: int = 16, amp_dtype=None):
    """Run ``fn(x, lengths)`` over whole utterances, batched by similar length.

    Parameters
    ----------
    fn : callable
        ``fn(x (B, 64, T) tensor, lengths (B,) tensor) -> tensor (B, D)`` (in eval mode).
    features : list of (64, T_i) float arrays
    device : torch.device
    batch_size : int

    Returns
    -------
    ndarray (N, D) float32, in the order of ``features``.
    """
    import torch

    n = len(features)
    order = np.argsort([f.shape[1] for f in features], kind="stable")
    out = None
    with torch.no_grad():
        for s in range(0, n, int(batch_size)):
            idx = order[s:s + int(batch_size)]
            x, lengths = pad_batch([features[i] for i in idx])
            x = x.to(device)
            lengths = lengths.to(device)
            if amp_dtype is not None:
                with torch.autocast(device_type=device.type, dtype=amp_dtype):
                    y = fn(x, lengths)
            else:
                y = fn(x, lengths)
            y = y.float().cpu().numpy()
            if out is None:
                out = np.empty((n, y.shape[1]), np.float32)
            out[idx] = y
    return out if out is not None else np.zeros((0, 0), np.float32)


class VoiceTask(Task):
    """Shared data handling: training set, feature bank, planner, loaders, test features."""

    with_targets = False

    def __init__(self, config: TrainConfig, *, dataset=None):
        super().__init__(config)
        from v2m_data.shards import open_dataset

        if not config.data:
            raise ValidationError("no build folder given", key="data")
        self.dataset = dataset if dataset is not None else open_dataset(config.data)
        self.train_split = self.dataset.split("train")
        if self.train_split.n_utterances == 0:
            raise ValidationError("the build has no training utterances", path=str(config.data))
        self.tset = self._training_set()
        self.bank = FeatureBank(self.train_split, self.tset.utterances, in_memory=True)
        self._loader_iter = None

    def _training_set(self):
        return training_set(self.train_split)

    def _targets_normalised(self):
        return None

    def _batches_source(self, run: Run) -> VoiceBatches:
        cfg = self.config
        planner = BatchPlanner(
            self.bank.n_frames, cfg.batch_size, CropConfig(cfg.min_frames, cfg.max_frames), cfg.seed,
            rank=run.env.rank, world_size=run.env.world_size, sampling=cfg.sampling, groups=self.tset.labels,
        )
        return VoiceBatches(self.bank, planner, labels=self.tset.labels, targets=self._targets_normalised())

    def batches(self, run: Run, start: int, stop: int):
        import torch

        src = self._batches_source(run)
        if self.config.loader == "gpu":
            dtype = getattr(torch, self.config.bank_dtype)
            dev = DeviceVoiceBatches(src, run.device, dtype=dtype)
            return dev.iterate(start, stop)
        loader = make_loader(
            src, start, stop, workers=self.config.workers, pin_memory=run.device.type == "cuda", seed=self.config.seed,
        )

        def gen():
            it = iter(loader)
            try:
                for b in it:
                    yield {k: v.to(run.device, non_blocking=True) for k, v in b.items()}
            finally:
                del it

        return gen()

    def _check_classes(self, state: dict) -> None:
        if "classes" in state and list(state["classes"]) != list(self.tset.names):
            raise ValidationError("the build's training identities differ from the checkpoint's", key="data")


# ------------------------------------------------------------------------------------- voice encoder
class VoiceEncoderTask(VoiceTask):
    """Speaker classification over the training identities (see the module docstring)."""

    kind = "voice-encoder"
    predictor = ""

    def setup(self, run: Run) -> None:
        import torch

        cfg = self.config
        model = SpeakerClassifier(len(self.tset.names), VoiceEncoder(cfg.encoder_channels)).to(run.device)
        self.modules = {"model": model}
        self.optimizers = {"model": make_adam(model.parameters(), cfg.lr, cfg.betas, cfg.weight_decay, run.device)}
        self.net = run.wrap(model)
        self._ce = torch.nn.CrossEntropyLoss()
        self._val = None

    def train_step(self, batch: dict, run: Run) -> dict:
        with run.autocast():
            logits = self.net(batch["features"])
            loss = self._ce(logits.float(), batch["label"])
        run.optimize(loss, "model", self.optimizers["model"])
        acc = (logits.detach().argmax(1) == batch["label"]).float().mean()
        return {"loss": loss.detach(), "acc": acc}

    def _val_data(self):
        if self._val is None:
            cfg = self.config
            rng = np.random.default_rng([cfg.seed, 0xA1])
            k = min(int(cfg.val_train_utterances), len(self.bank))
            items = np.sort(rng.choice(len(self.bank), size=k, replace=False)) if k else np.zeros(0, np.int64)
            train_feats = [self.bank.utterance(int(i)) for i in items]
            train_labels = self.tset.labels[items]
            test_feats, test_groups = [], []
            if "test" in self.dataset.splits:
                ts = self.dataset.split("test")
                names, utts, _ = select_test_utterances(ts, int(cfg.val_test_utterances))
                test_feats = whole_utterances(ts, utts)
                _, test_groups = np.unique(np.asarray(names, dtype=object).astype(str), return_inverse=True)
            self._val = (train_feats, train_labels, test_feats, np.asarray(test_groups, np.int64))
        return self._val

    def validate(self, run: Run) -> dict:
        model = self.modules["model"]
        model.eval()
        train_feats, train_labels, test_feats, test_groups = self._val_data()
        out = {}
        if train_feats:
            logits = embed_utterances(lambda x, n: model(x, n), train_feats, run.device, self.config.val_batch_size)
            out["train_whole_acc"] = float((logits.argmax(1) == train_labels).mean())
        if len(test_feats) and len(np.unique(test_groups)) >= 2:
            emb = embed_utterances(lambda x, n: model.encoder(x, n, normalize=True), test_feats, run.device, self.config.val_batch_size)
            out["test_id_acc"] = centroid_identification(emb, test_groups)
            out["test_id_chance"] = 1.0 / len(np.unique(test_groups))
        return out

    def state_dict(self) -> dict:
        return {"classes": list(self.tset.names), "encoder": {"channels": list(self.config.encoder_channels)}}

    def load_state_dict(self, state: dict) -> None:
        self._check_classes(state)


def centroid_identification(embeddings: np.ndarray, groups: np.ndarray) -> float:
    """Leave-one-out nearest-centroid identification accuracy.

    Parameters
    ----------
    embeddings : (N, D) float
        L2-normalised embeddings.
    groups : (N,) int
        Identity of each row.

    Returns
    -------
    float
        Fraction of rows whose highest cosine similarity is to their own identity's centroid
        (computed without the row itself); rows whose identity has a single utterance are skipped.
    """
    e = np.asarray(embeddings, np.float64)
    g = np.asarray(groups, np.int64)
    ids = np.unique(g)
    sums = np.stack([e[g == i].sum(0) for i in ids])
    counts = np.array([(g == i).sum() for i in ids], np.float64)
    pos = np.searchsorted(ids, g)
    correct, total = 0, 0
    for r in range(len(e)):
        if counts[pos[r]] < 2:
            continue
        cent = sums.copy()
        cent[pos[r]] -= e[r]
        cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
        correct += int(np.argmax(cent @ e[r]) == pos[r])
        total += 1
    return correct / total if total else float("nan")


# ------------------------------------------------------------------------------------- supervised
class SupervisedTask(VoiceTask):
    """L2 regression of normalised 3DMM coefficients from voice (see the module docstring)."""

    kind = "supervised"
    predictor = "v2m_models.supervised:load_predictor"

    def __init__(self, config: SupervisedConfig, *, dataset=None):
        self._encoder_ck = None
        if config.encoder:
            enc, ck = load_encoder(config.encoder)
            self._encoder_ck = (enc, ck)
            config.encoder_channels = tuple(int(c) for c in enc.channels)
        super().__init__(config, dataset=dataset)
        self.stats = CoefficientStats.fit(self.tset.targets)

    def _training_set(self):
        cfg = self.config
        rule = TargetRule(method=cfg.target, fallback=cfg.target_fallback, source=cfg.targets)
        sstd = estd = None
        if cfg.target == "reference" and cfg.targets == "image":
            bfm = find_bfm(cfg.bfm, self.dataset)
            if bfm is None:
                raise ValidationError("target 'reference' needs the BFM (its coefficient std): set V2M_BFM_DIR or --bfm", key="target")
            sstd, estd = bfm.shape_std, bfm.expression_std
        return training_set(self.train_split, with_targets=True, rule=rule, shape_std=sstd, expression_std=estd,
                            shuffle_pairs=cfg.shuffle_pairs and cfg.shuffle_mode == "fixed", seed=cfg.seed)

    def _targets_normalised(self):
        return self.stats.normalise(self.tset.targets.astype(np.float32))

    def setup(self, run: Run) -> None:
        import torch

        cfg = self.config
        enc = self._encoder_ck[0] if self._encoder_ck is not None else VoiceEncoder(cfg.encoder_channels)
        model = SupervisedModel(enc, freeze_encoder=cfg.freeze_encoder, normalize_embedding=cfg.normalize_embedding).to(run.device)
        self.modules = {"model": model}
        self.optimizers = {"model": make_adam(model.parameters(), cfg.lr, cfg.betas, cfg.weight_decay, run.device)}
        self.net = run.wrap(model.head if cfg.freeze_encoder else model)
        w = torch.ones(50, device=run.device)
        w[40:] = float(cfg.expression_weight)
        self._w = w / w.mean()
        self._targets_dev = None
        if cfg.shuffle_pairs and cfg.shuffle_mode == "iteration":
            self._targets_dev = torch.as_tensor(self._targets_normalised(), device=run.device)
        self._val = None
        self._bfm = None
        self._bfm_looked = False

    def _forward(self, x):
        model = self.modules["model"]
        if self.config.freeze_encoder:
            with self._no_grad():
                emb = model.encoder(x, normalize=model.normalize_embedding)
            return self.net(emb.float())["coefficients"]
        return self.net(x)["coefficients"]

    @staticmethod
    def _no_grad():
        import torch

        return torch.no_grad()

    def _iteration_targets(self, labels, iteration: int):
        """Normalised targets of ``labels`` under this iteration's permutation of the classes."""
        import torch

        g = torch.Generator()
        g.manual_seed(int(np.random.SeedSequence([int(self.config.seed), 0x5F1, int(iteration)]).generate_state(1)[0]))
        perm = torch.randperm(self._targets_dev.shape[0], generator=g).to(self._targets_dev.device)
        return self._targets_dev[perm[labels]]

    def train_step(self, batch: dict, run: Run) -> dict:
        target = batch["target"] if self._targets_dev is None else self._iteration_targets(batch["label"], run.iteration)
        with run.autocast():
            pred = self._forward(batch["features"])
        sq = (pred.float() - target) ** 2
        loss = (sq * self._w).mean()
        run.optimize(loss, "model", self.optimizers["model"])
        sq = sq.detach()
        return {"loss": loss.detach(), "loss_shape": sq[:, :40].mean(), "loss_expression": sq[:, 40:].mean()}

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
                        self._val = (names, whole_utterances(ts, utts), ref_rows, refs)
            if not self._val:
                run.log("no test references in the build: validation reports nothing")
        return self._val

    def _geometry(self, run: Run):
        if not self._bfm_looked:
            self._bfm_looked = True
            self._bfm = usable_bfm(self.config.bfm, self.dataset, run.log)
        return self._bfm

    def validate(self, run: Run) -> dict:
        val = self._val_data(run)
        if not val:
            return {}
        names, feats, ref_rows, refs = val
        model = self.modules["model"]
        model.eval()
        z = embed_utterances(lambda x, n: model(x, n)["coefficients"], feats, run.device, self.config.val_batch_size)
        coeff = self.stats.denormalise(z)
        ref_c = np.concatenate([refs.shape, refs.expression], axis=1).astype(np.float32)[ref_rows]
        out = {"val_loss": float(np.mean((z - self.stats.normalise(ref_c)) ** 2))}
        bfm = self._geometry(run)
        if bfm is not None:
            out.update(geometric_metrics(bfm, coeff, ref_c, names))
        return out

    def state_dict(self) -> dict:
        cfg = self.config
        return {
            "stats": self.stats.to_dict(),
            "classes": list(self.tset.names),
            "n_fits": [int(x) for x in self.tset.n_fits],
            "shuffled": bool(cfg.shuffle_pairs),
            "shuffle_mode": cfg.shuffle_mode if cfg.shuffle_pairs else "",
            "target_rule": dataclasses.asdict(TargetRule(method=cfg.target, fallback=cfg.target_fallback, source=cfg.targets)),
            "encoder": {"channels": list(cfg.encoder_channels), "normalize_embedding": bool(cfg.normalize_embedding)},
            "n_shape": 40,
            "n_exp": 10,
            "encoder_source": str(cfg.encoder or ""),
        }

    def load_state_dict(self, state: dict) -> None:
        self._check_classes(state)


def geometric_metrics(bfm, coefficients: np.ndarray, ref_coefficients: np.ndarray, identity, chunk: int = 64) -> dict:
    """ER, ARE_mean and NME (official) of predictions against references, macro-averaged over
    identities, and the same for the mean face (``*_meanface``).

    Parameters
    ----------
    bfm : MorphableModel
    coefficients, ref_coefficients : (N, 50) float
        Prediction and matching reference coefficients (40 shape + 10 expression, BFM units).
    identity : sequence of str, length N

    Returns
    -------
    dict of float
    """
    from v2m_bench import metrics

    n = len(coefficients)
    vals = {k: np.empty(n) for k in ("ER", "ARE_mean", "NME", "ER_meanface", "ARE_mean_meanface", "NME_meanface")}
    for s in range(0, n, chunk):
        sl = slice(s, min(n, s + chunk))
        p = bfm.vertices(coefficients[sl, :40], coefficients[sl, 40:])
        r = bfm.vertices(ref_coefficients[sl, :40], ref_coefficients[sl, 40:])
        mf = np.broadcast_to(bfm.mean, p.shape)
        for suffix, v in (("", p), ("_meanface", mf)):
            a = metrics.are(v, r)
            vals["ER" + suffix][sl] = a["ER"]
            vals["ARE_mean" + suffix][sl] = a["mean"]
            vals["NME" + suffix][sl] = metrics.nme_official(v, r, bfm.keypoints)
    ids = np.asarray(identity).astype(str)
    uniq, inv = np.unique(ids, return_inverse=True)
    out = {}
    for k, v in vals.items():
        per = np.bincount(inv, weights=v, minlength=len(uniq)) / np.bincount(inv, minlength=len(uniq))
        out[k] = float(per.mean())
    return out


# ------------------------------------------------------------------------------------- entry points
def train_voice_encoder(config: VoiceEncoderConfig, out, *, resume: bool = False, log=None, dataset=None) -> FitResult:
    """Train a speaker classifier; see :func:`v2m_models.training.fit`."""
    return fit(VoiceEncoderTask(config, dataset=dataset), out, resume=resume, log=log)


def train_supervised(config: SupervisedConfig, out, *, resume: bool = False, log=None, dataset=None) -> FitResult:
    """Train the supervised voice -> 3DMM model; see :func:`v2m_models.training.fit`."""
    return fit(SupervisedTask(config, dataset=dataset), out, resume=resume, log=log)


# ------------------------------------------------------------------------------------- predictor
class SupervisedPredictor:
    """Voice -> BFM coefficients with a trained supervised model.

    Parameters
    ----------
    model : SupervisedModel
    stats : CoefficientStats
    device : torch.device
    batch_size : int
        Whole utterances per forward pass.
    """

    def __init__(self, model: SupervisedModel, stats: CoefficientStats, device, batch_size: int = 16):
        self.model = model.eval()
        self.stats = stats
        self.device = device
        self.batch_size = int(batch_size)

    def predict(self, features) -> dict:
        """Coefficients for whole utterances.

        Parameters
        ----------
        features : list of (64, T_i) float32 arrays
            Normalised log-mel features (as the build stores them).

        Returns
        -------
        dict
            ``shape`` (N, 40) and ``expression`` (N, 10) float32, BFM units (de-normalised).
        """
        if not len(features):
            return {"shape": np.zeros((0, 40), np.float32), "expression": np.zeros((0, 10), np.float32)}
        z = embed_utterances(lambda x, n: self.model(x, n)["coefficients"], list(features), self.device, self.batch_size)
        c = self.stats.denormalise(z).astype(np.float32)
        return {"shape": c[:, :40], "expression": c[:, 40:]}


def load_predictor(checkpoint: dict, device, batch_size: int = 16) -> SupervisedPredictor:
    """A :class:`SupervisedPredictor` from a loaded supervised checkpoint dict."""
    task = checkpoint.get("task", {})
    if "stats" not in task:
        raise ValidationError("supervised checkpoint without coefficient statistics", key="task.stats")
    enc_info = task.get("encoder", {})
    enc = VoiceEncoder(tuple(int(c) for c in enc_info.get("channels", VOICE_CHANNELS)))
    model = SupervisedModel(enc, normalize_embedding=bool(enc_info.get("normalize_embedding", True)),
                            n_shape=int(task.get("n_shape", 40)), n_exp=int(task.get("n_exp", 10)))
    model.load_state_dict(checkpoint["modules"]["model"])
    return SupervisedPredictor(model.to(device), CoefficientStats.from_dict(task["stats"]), device, batch_size)
