"""``v2m-train``: train the voice encoder and the supervised voice -> 3DMM model.

::

    v2m-train voice-encoder --data BUILD --out encoder.pt [options]
    v2m-train supervised --data BUILD --out supervised.pt [--encoder encoder.pt] [--freeze-encoder]
    torchrun --nproc-per-node 4 -m v2m_cli.train supervised ...          # multi-GPU (DDP)

Every trainer takes --iterations, --batch-size, --lr, --device, --seed and --resume; CUDA (with
mixed precision) is used when available. With --resume the run continues from --out, and the
options not given on the command line keep the checkpoint's values. Exit status 2 with a
one-line ``error: ...`` for user errors.
"""

from __future__ import annotations

import dataclasses

import click

from v2m_models.supervised import SupervisedConfig, VoiceEncoderConfig

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


def common_options(cls):
    """The options every trainer shares (defaults from the config dataclass ``cls``)."""
    d = _defaults(cls)

    def deco(fn):
        opts = [
            click.option("--data", required=True, metavar="DIR", help="Build folder (v2m-build-dataset --out)."),
            click.option("--out", required=True, metavar="CKPT", help="Checkpoint to write (also written periodically)."),
            click.option("--iterations", type=click.IntRange(min=1), default=d["iterations"], show_default=True),
            click.option("--batch-size", type=click.IntRange(min=1), default=d["batch_size"], show_default=True,
                         help="Global batch (split over DDP ranks)."),
            click.option("--lr", type=float, default=d["lr"], show_default=True, help="Adam learning rate."),
            click.option("--weight-decay", type=float, default=d["weight_decay"], show_default=True),
            click.option("--grad-clip", type=float, default=d["grad_clip"], show_default=True, help="Max gradient norm (0: off)."),
            click.option("--device", default=d["device"], show_default=True, help="auto (CUDA when available), cpu, cuda, cuda:N."),
            click.option("--seed", type=click.IntRange(min=0), default=d["seed"], show_default=True),
            click.option("--resume", is_flag=True, help="Continue from --out when it exists."),
            click.option("--amp", type=click.Choice(["auto", "bf16", "fp16", "off"]), default=d["amp"], show_default=True,
                         help="Mixed precision on CUDA (auto: bf16 if supported, else fp16 + GradScaler)."),
            click.option("--loader", type=click.Choice(["cpu", "gpu"]), default=d["loader"], show_default=True,
                         help="cpu: DataLoader workers; gpu: feature bank on the device, crops cut there."),
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
            click.option("--log-every", type=click.IntRange(min=0), default=d["log_every"], show_default=True),
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
            fn = o(fn)
        return fn

    return deco


def _config(ctx: click.Context, cls, params: dict, log):
    """Build the config; with --resume, options left at their defaults take the checkpoint's values."""
    from pathlib import Path

    from v2m_models.training import config_from_dict, load_checkpoint

    params = dict(params)
    resume = params.pop("resume")
    out = params.pop("out")
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
    return cfg, out, resume


def _report(result, log) -> None:
    click.echo(
        f"{result.checkpoint}: iteration {result.iteration} ({result.iteration - result.start} run now, "
        f"{result.iterations_per_s:.2f} it/s, {result.samples_per_s:.0f} samples/s)"
    )
    if result.train:
        click.echo("train: " + ", ".join(f"{k} {v:.4g}" for k, v in result.train.items()))
    if result.metrics:
        click.echo("validation: " + ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """Train voice2mesh models (voice encoder, supervised voice -> 3DMM).

    Multi-GPU: run under torchrun (``torchrun --nproc-per-node N -m v2m_cli.train ...``); each
    process reads RANK / WORLD_SIZE / LOCAL_RANK.
    """


def _log(msg: str) -> None:
    click.echo(msg, err=True)


@main.command("voice-encoder")
@common_options(VoiceEncoderConfig)
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
@click.option("--expression-weight", type=float, default=1.0, show_default=True, help="Loss weight of the expression terms.")
@click.option("--shuffle-pairs", is_flag=True, help="Debugging control: permute the identity -> target mapping.")
@click.pass_context
@user_errors
def supervised(ctx, **params):
    """Train the supervised model: voice encoder -> 40 shape + 10 expression coefficients, L2 on
    coefficients normalised by the training-set statistics (defaults as the paper: Adam 2e-4,
    batch 128, 50K iterations)."""
    from v2m_models.supervised import train_supervised

    cfg, out, resume = _config(ctx, SupervisedConfig, params, _log)
    _report(train_supervised(cfg, out, resume=resume, log=_log), _log)


__all__ = ["main", "UserError"]


if __name__ == "__main__":  # pragma: no cover
    main()
