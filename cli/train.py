"""``v2m-train``: train the voice encoder, the supervised voice -> 3DMM model, the image -> 3DMM
teacher and the unsupervised (GAN + distilled student) model.

::

    v2m-train voice-encoder --data BUILD --out encoder.pt [options]
    v2m-train supervised --data BUILD --out supervised.pt [--encoder encoder.pt] [--freeze-encoder]
    v2m-train teacher --data BUILD --out teacher.pt
    v2m-train unsupervised --data BUILD --encoder encoder.pt --teacher teacher.pt --out unsup.pt --kd pkt
    v2m-train unsupervised ... --recipe official        # the released code's recipe (docs/training.md)
    torchrun --nproc-per-node 4 -m v2m_cli.train supervised ...          # multi-GPU (DDP)

Every trainer takes --iterations, --batch-size, --lr, --device, --seed and --resume; CUDA (with
mixed precision) is used when available. With --resume the run continues from --out, and the
options not given on the command line keep the checkpoint's values. Exit status 2 with a
one-line ``error: ...`` for user errors.
"""

from __future__ import annotations

import dataclasses

import click

from v2m_bench import __version__
from v2m_models.supervised import SupervisedConfig, VoiceEncoderConfig
from v2m_models.teacher import TeacherConfig
from v2m_models.unsupervised import UnsupervisedConfig

from ._common import UserError, progress_enabled, user_errors


def _defaults(cls) -> dict:
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory()) for f in dataclasses.fields(cls)}


def _channels(value):
    if value is None or isinstance(value, tuple):
        return value
    try:
        out = tuple(int(x) for x in str(value).split(","))
    except ValueError:
        raise click.BadParameter(f"expected six comma-separated integers, got {value!r}") from None
    if len(out) != 6 or any(c < 1 for c in out):
        raise click.BadParameter(f"expected six positive comma-separated integers, got {value!r}")
    return out


def _widths(n: int):
    def parse(ctx, param, value):
        if value is None or isinstance(value, tuple):
            return value
        try:
            out = tuple(int(x) for x in str(value).split(","))
        except ValueError:
            raise click.BadParameter(f"expected {n} comma-separated integers, got {value!r}") from None
        if len(out) != n or any(c < 1 for c in out):
            raise click.BadParameter(f"expected {n} positive comma-separated integers, got {value!r}")
        return out

    return parse


#: Options of the voice data pipeline (left out for the image-only teacher).
VOICE_OPTIONS = frozenset({"bank_dtype", "workers", "min_frames", "max_frames", "sampling", "encoder_channels"})


def common_options(cls, exclude=frozenset()):
    """The options every trainer shares (defaults from the config dataclass ``cls``), except the
    config fields named in ``exclude``."""
    d = _defaults(cls)

    def deco(fn):
        opts = [
            click.option("--data", required=True, metavar="DIR", help="Build folder (v2m-build-dataset --out)."),
            click.option("--out", required=True, metavar="CKPT", help="Checkpoint to write (also written periodically)."),
            click.option("--iterations", type=click.IntRange(min=1), default=d["iterations"], show_default=True,
                         help="Optimiser steps in all (a resumed run continues up to this count)."),
            click.option("--batch-size", type=click.IntRange(min=1), default=d["batch_size"], show_default=True,
                         help="Global batch (split over DDP ranks)."),
            click.option("--lr", type=float, default=d["lr"], show_default=True, help="Adam learning rate."),
            click.option("--weight-decay", type=float, default=d["weight_decay"], show_default=True,
                         help="Adam weight decay (L2)."),
            click.option("--grad-clip", type=float, default=d["grad_clip"], show_default=True, help="Max gradient norm (0: off)."),
            click.option("--device", default=d["device"], show_default=True, help="auto (CUDA when available), cpu, cuda, cuda:N."),
            click.option("--seed", type=click.IntRange(min=0), default=d["seed"], show_default=True,
                         help="Seed of every random choice (same seed, same run)."),
            click.option("--resume", is_flag=True, help="Continue from --out when it exists."),
            click.option("--overwrite", is_flag=True, help="Replace an existing --out (without it, an existing "
                         "checkpoint is refused unless --resume)."),
            click.option("--amp", type=click.Choice(["auto", "bf16", "fp16", "off"]), default=d["amp"], show_default=True,
                         help="Mixed precision on CUDA (auto: bf16 if supported, else fp16 + GradScaler)."),
            click.option("--loader", type=click.Choice(["cpu", "gpu"]), default=d["loader"], show_default=True,
                         help="cpu: DataLoader workers prepare the batches; gpu: the training data (voice features or "
                         "face crops) stay on the device and batches are cut there."),
            click.option("--bank-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=d["bank_dtype"],
                         show_default=True, help="Storage of the device feature bank (--loader gpu)."),
            click.option("--workers", type=click.IntRange(min=0), default=d["workers"], show_default=True,
                         help="DataLoader worker processes (--loader cpu)."),
            click.option("--min-frames", type=click.IntRange(min=1), default=d["min_frames"], show_default=True,
                         help="Shortest training crop (10 ms frames)."),
            click.option("--max-frames", type=click.IntRange(min=1), default=d["max_frames"], show_default=True,
                         help="Longest training crop."),
            click.option("--sampling", type=click.Choice(["utterance", "identity"]), default=d["sampling"], show_default=True,
                         help="Epochs over utterances, or a uniform identity then one of its utterances."),
            click.option("--channels", "encoder_channels", callback=lambda c, p, v: _channels(v), default=None,
                         metavar="C0,..,C5", help="Voice-encoder widths (default 64,256,384,576,864,64)."),
            click.option("--log-every", type=click.IntRange(min=0), default=d["log_every"], show_default=True,
                         help="Write the training losses to the metrics log every K iterations (0: never)."),
            click.option("--val-every", type=click.IntRange(min=0), default=d["val_every"], show_default=True,
                         help="Iterations between validations (0: only at the end)."),
            click.option("--ckpt-every", type=click.IntRange(min=0), default=d["ckpt_every"], show_default=True,
                         help="Iterations between checkpoints (0: only at the end)."),
            click.option("--metrics", metavar="CSV", default=None, help="Metrics log (default: <out stem>.metrics.csv)."),
            click.option("--bfm", metavar="DIR", default=None, help="BFM for validation metrics (default: $V2M_BFM_DIR, the build's, the cache)."),
            click.option("--compile", is_flag=True, help="torch.compile the trained modules."),
            click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal)."),
        ]
        for o in reversed(opts):
            probe = o(lambda: None)
            name = probe.__click_params__[0].name
            if name in exclude:
                continue
            fn = o(fn)
        return fn

    return deco


def _config(ctx: click.Context, cls, params: dict, log):
    """Build the config; with --resume, options left at their defaults take the checkpoint's values."""
    from pathlib import Path

    from v2m_models.training import config_from_dict, load_checkpoint

    params = dict(params)
    resume = params.pop("resume")
    overwrite = params.pop("overwrite", False)
    out = params.pop("out")
    if Path(out).is_symlink() or (Path(out).exists() and not Path(out).is_file()):
        raise UserError(f"{out}: --out must be a checkpoint file path, not a folder or a symbolic link")

    params["progress"] = progress_enabled(params.get("progress"))
    if params.get("encoder_channels") is None:
        params.pop("encoder_channels", None)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(params) - names
    if unknown:  # pragma: no cover - a programming error
        raise RuntimeError(f"options without config fields: {sorted(unknown)}")
    if resume and Path(out).is_file():
        stored = load_checkpoint(out)["config"]
        for k in list(params):
            src = ctx.get_parameter_source(k)
            if k in stored and src is not None and src.name == "DEFAULT" and k not in ("progress",):
                params.pop(k)
        if "encoder_channels" not in params and "encoder_channels" in stored:
            params["encoder_channels"] = tuple(stored["encoder_channels"])
        cfg = config_from_dict(cls, stored, **params)
        log(f"resuming {out}")
    else:
        cfg = cls(**params)
    _check_channels(cfg)
    if not resume and not overwrite and Path(out).exists():
        raise UserError(f"{out}: exists; pass --resume to continue that run or --overwrite to replace it")
    return cfg, out, resume


def _check_channels(cfg) -> None:
    """The voice encoder's first width must be the build's log-mel band count (checked before training)."""
    channels = getattr(cfg, "encoder_channels", None)
    if not channels:
        return
    n_mels = 64
    try:
        from v2m_data.shards import open_dataset

        ds = open_dataset(cfg.data)
        if ds.shards:
            n_mels = int(ds.shards[0].attrs["n_mels"])
    except Exception:  # noqa: BLE001 - an unreadable build is reported by the run itself
        pass
    if int(channels[0]) != n_mels:
        raise UserError(f"--channels: the first width is the number of log-mel bands of the build's features "
                        f"({n_mels}), got {channels[0]}")


def _report(result, log) -> None:
    import os

    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 reports for the job
        return
    click.echo(
        f"{result.checkpoint}: iteration {result.iteration} ({result.iteration - result.start} run now, "
        f"{result.iterations_per_s:.2f} it/s, {result.samples_per_s:.0f} samples/s)"
    )
    if result.train:
        click.echo("train: " + ", ".join(f"{k} {v:.4g}" for k, v in result.train.items()))
    if result.metrics:
        click.echo("validation: " + ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="v2m-train")
def main():
    """Train voice2mesh models (voice encoder, supervised voice -> 3DMM, image -> 3DMM teacher,
    unsupervised GAN + distilled student).

    Multi-GPU: run under torchrun (``torchrun --nproc-per-node N -m v2m_cli.train ...``); each
    process reads RANK / WORLD_SIZE / LOCAL_RANK.
    """


def _log(msg: str) -> None:
    click.echo(msg, err=True)


@main.command("voice-encoder")
@common_options(VoiceEncoderConfig, exclude={"bfm"})  # validated by speaker accuracy: no mesh metrics
@click.pass_context
@user_errors
def voice_encoder(ctx, **params):
    """Pretrain the voice encoder as a speaker classifier over the training identities."""
    from v2m_models.supervised import train_voice_encoder

    cfg, out, resume = _config(ctx, VoiceEncoderConfig, params, _log)
    _report(train_voice_encoder(cfg, out, resume=resume, log=_log), _log)


@main.command("supervised")
@common_options(SupervisedConfig)
@click.option("--encoder", metavar="CKPT", default=None, help="Start the encoder from this voice-encoder checkpoint.")
@click.option("--freeze-encoder", is_flag=True, help="Train only the coefficient heads (needs --encoder).")
@click.option("--target", type=click.Choice(["median", "reference"]), default="median", show_default=True,
              help="Identity target: median of its frontal fits, or the fit the reference rule picks.")
@click.option("--target-fallback", is_flag=True, help="Identities without frontal fits use all their valid fits.")
@click.option("--targets", type=click.Choice(["image", "identity"]), default="image", show_default=True,
              help="image: targets from the per-image fits (--target; the paper's); identity: the build's identity labels.")
@click.option("--expression-weight", type=float, default=1.0, show_default=True, help="Loss weight of the expression terms.")
@click.option("--shuffle-pairs", is_flag=True, help="Control experiment: break the voice/target pairing (see --shuffle-mode).")
@click.option("--shuffle-mode", type=click.Choice(["fixed", "iteration"]), default="fixed", show_default=True,
              help="fixed: one seeded permutation of identity -> target; iteration: a fresh one every iteration.")
@click.pass_context
@user_errors
def supervised(ctx, **params):
    """Train the supervised model: voice encoder -> 40 shape + 10 expression coefficients, L2 on
    coefficients normalised by the training-set statistics (defaults as the paper: Adam 2e-4,
    batch 128, 50K iterations)."""
    from v2m_models.supervised import train_supervised

    cfg, out, resume = _config(ctx, SupervisedConfig, params, _log)
    _report(train_supervised(cfg, out, resume=resume, log=_log), _log)


@main.command("teacher")
@common_options(TeacherConfig, exclude=VOICE_OPTIONS)
@click.option("--width-mult", type=float, default=1.0, show_default=True, help="MobileNetV2 width multiplier.")
@click.option("--last-channels", type=click.IntRange(min=1), default=None, help="Width of the last conv (default 1280).")
@click.option("--dropout", type=float, default=0.2, show_default=True, help="Dropout before the linear layer.")
@click.option("--face-size", type=click.IntRange(min=32), default=120, show_default=True,
              help="Crop size read from the build (it must have stored it).")
@click.option("--input-size", type=click.IntRange(min=32), default=120, show_default=True,
              help="Network input size; crops are bilinearly resized to it (--face-size 64: as the GAN's faces).")
@click.option("--max-residual", type=float, default=0.0, show_default=True,
              help="Train on fits with residual_normalized <= this (0: every converged fit).")
@click.option("--pose-weight", type=float, default=1.0, show_default=True, help="Loss weight of the 12 pose entries.")
@click.option("--val-images", type=click.IntRange(min=0), default=512, show_default=True,
              help="Test images for the validation loss.")
@click.pass_context
@user_errors
def teacher(ctx, **params):
    """Train the image -> 3DMM teacher: MobileNetV2, 120x120 RGB crop -> 62 parameters (12 pose +
    40 shape + 10 expression, normalised), L2, on the build's own (face crop, fitted parameters)
    pairs of the training split."""
    from v2m_models.teacher import train_teacher

    cfg, out, resume = _config(ctx, TeacherConfig, params, _log)
    _report(train_teacher(cfg, out, resume=resume, log=_log), _log)


@main.command("unsupervised")
@common_options(UnsupervisedConfig, exclude=frozenset({"encoder_channels"}))
@click.option("--encoder", metavar="CKPT", default="", help="The pretrained voice encoder (v2m-train voice-encoder); frozen.")
@click.option("--teacher", metavar="CKPT", default=None,
              help="The image -> 3DMM teacher (v2m-train teacher, or a state dict of the same architecture).")
@click.option("--kd", type=click.Choice(["pkt", "kd", "at", "sp", "cc", "rkd", "crd", "vid", "none"]), default="pkt",
              show_default=True, help="Feature distillation loss; none: train the GAN alone (for the cascade baseline).")
@click.option("--kd-weight", type=float, default=None, help="Override the distillation loss's default weight.")
@click.option("--recipe", type=click.Choice(["paper", "official"]), default="paper", show_default=True,
              help="Preset of --batch-size, --param-weight, --mesh-weight, --mesh-space, --triplet-weight, "
                   "--triplet-margin and --joint/--detach-generator (an option given explicitly wins). paper: "
                   "128, 1, 0.5, neutral, 0, 1, detach; official (the released code): 64, 0, 0.5, posed, 1.5, 1, joint.")
@click.option("--param-weight", type=float, default=1.0, show_default=True,
              help="Weight of the normalised-parameter L2 (official recipe: 0).")
@click.option("--mesh-weight", type=float, default=0.5, show_default=True,
              help="Weight of the mesh L2 (needs the morphable model; 0: off).")
@click.option("--mesh-space", type=click.Choice(["neutral", "posed"]), default="neutral", show_default=True,
              help="Mesh loss and triplet distance on neutral meshes (mm) or on posed dense vertices (input pixels; "
                   "official recipe).")
@click.option("--triplet-weight", type=float, default=0.0, show_default=True,
              help="Weight of the triplet margin loss on the student's meshes (anchor voice, another utterance of the "
                   "same identity, an utterance of another identity; official recipe: 1.5; 0: off).")
@click.option("--triplet-margin", type=float, default=1.0, show_default=True, help="Margin of the triplet loss.")
@click.option("--joint-generator/--detach-generator", default=False, show_default=True,
              help="The student's loss also trains the generator (official recipe), or only the GAN terms do (paper).")
@click.option("--student-width", type=float, default=1.0, show_default=True, help="Student MobileNetV2 width multiplier.")
@click.option("--student-last-channels", type=click.IntRange(min=1), default=None, help="Student's last conv width (1280).")
@click.option("--generator-channels", callback=_widths(5), default=None, metavar="C0,..,C4",
              help="Generator widths (default 1024,512,256,128,64).")
@click.option("--trunk-channels", callback=_widths(5), default=None, metavar="C0,..,C4",
              help="Discriminator/classifier trunk widths (default 32,64,128,256,512).")
@click.option("--flip/--no-flip", default=True, show_default=True, help="Random horizontal flips of the real faces.")
@click.option("--gan-weight", type=float, default=1.0, show_default=True, help="Weight of the generator's identity term.")
@click.option("--crd-negatives", type=click.IntRange(min=1), default=16384, show_default=True, help="CRD negatives per sample.")
@click.pass_context
@user_errors
def unsupervised(ctx, **params):
    """Train the unsupervised model: GAN (frozen pretrained voice encoder -> 64x64 face generator,
    discriminator, identity classifier) and a MobileNetV2 student on the generated faces
    (upsampled to 120x120) distilled from the teacher: parameter and mesh L2 + the --kd loss.
    Defaults: Adam 2e-4, betas 0.5/0.999; --recipe paper (batch 128) or official (batch 64, posed
    meshes, triplet, joint generator)."""
    from v2m_models.unsupervised import train_unsupervised

    from v2m_models.unsupervised import RECIPES

    for k in ("generator_channels", "trunk_channels"):
        if params.get(k) is None:
            params.pop(k)
    for k, v in RECIPES[params["recipe"]].items():  # the preset fills the options left at their defaults
        src = ctx.get_parameter_source(k)
        if src is not None and src.name == "DEFAULT":
            params[k] = v
    cfg, out, resume = _config(ctx, UnsupervisedConfig, params, _log)
    _report(train_unsupervised(cfg, out, resume=resume, log=_log), _log)


__all__ = ["main", "UserError", "common_options"]


if __name__ == "__main__":  # pragma: no cover
    main()
