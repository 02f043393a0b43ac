"""``v2m-predict``: write the benchmark's predictions.h5 from a trained checkpoint.

::

    v2m-predict --checkpoint supervised.pt --data BUILD --out predictions.h5
    v2m-predict --checkpoint unsupervised.pt --data BUILD --out predictions.h5
    v2m-predict cascade --generator unsupervised.pt --teacher teacher.pt --data BUILD --out baseline.h5
    v2m-bench score predictions.h5 --references BUILD/references.h5

Exit status 2 with a one-line ``error: ...`` for user errors.
"""

from __future__ import annotations

import click

from v2m_bench import __version__

from ._common import UserError, user_errors


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="v2m-predict")
@click.option("--checkpoint", metavar="CKPT", help="A face-model checkpoint (v2m-train supervised, ...).")
@click.option("--data", metavar="DIR", help="Build folder holding the test split (and references.h5).")
@click.option("--out", metavar="H5", help="predictions.h5 to write (atomically).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu, cuda, cuda:N.")
@click.option("--per-identity", type=click.IntRange(min=1), default=3, show_default=True,
              help="Utterances per identity: the first N sorted by video id then utterance id (3: the benchmark).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Whole utterances per forward pass.")
@click.option("--all-test-identities", is_flag=True,
              help="Predict every test identity with utterances, not only those of references.h5.")
@click.option("--model-name", default=None, help="The file's 'model' attribute (default: the checkpoint's file name).")
@click.pass_context
@user_errors
def main(ctx, checkpoint, data, out, device, per_identity, batch_size, all_test_identities, model_name):
    """Predict the 3D faces of the test utterances of a build with a trained checkpoint.

    For each test identity (those of BUILD/references.h5 by default), the first three utterances
    sorted by video then utterance id are run whole through the model; the de-normalised 40 shape
    + 10 expression BFM coefficients are written in v2m-bench's predictions format. Works for
    supervised and unsupervised (voice -> generator -> student) checkpoints; the cascade baseline
    is the subcommand ``v2m-predict cascade``.
    """
    if ctx.invoked_subcommand is not None:
        return
    missing = [n for n, v in (("--checkpoint", checkpoint), ("--data", data), ("--out", out)) if not v]
    if missing:
        raise UserError(f"missing {', '.join(missing)} (see --help)")
    from v2m_data.shards import open_dataset
    from v2m_models.predict import predict

    identities = None
    if all_test_identities:
        identities = [str(x) for x in open_dataset(data).split("test").identities["name"]]
    result = predict(checkpoint, data, out, device=device, per_identity=per_identity, batch_size=batch_size,
                     identities=identities, model_name=model_name)
    click.echo(result.summary())


@main.command("cascade")
@click.option("--generator", required=True, metavar="CKPT",
              help="Voice -> face generator: a v2m-train unsupervised checkpoint (or a GAN-only one, --kd none).")
@click.option("--teacher", required=True, metavar="CKPT",
              help="Image -> 3DMM network: a v2m-train teacher checkpoint or a state dict of the same architecture.")
@click.option("--data", required=True, metavar="DIR", help="Build folder holding the test split (and references.h5).")
@click.option("--out", required=True, metavar="H5", help="predictions.h5 to write (atomically).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu, cuda, cuda:N.")
@click.option("--per-identity", type=click.IntRange(min=1), default=3, show_default=True,
              help="Utterances per identity (3: the benchmark).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Whole utterances per forward pass.")
@click.option("--all-test-identities", is_flag=True,
              help="Predict every test identity with utterances, not only those of references.h5.")
@click.option("--model-name", default=None, help="The file's 'model' attribute (default: cascade:<generator>+<teacher>).")
@click.option("--bfm", metavar="DIR", default=None,
              help="Model whose 3DDFA param_whitening de-whitens a plain state-dict teacher (default: $V2M_BFM_DIR, the cache).")
@click.option("--teacher-format", type=click.Choice(["rgb", "bgr"]), default="rgb", show_default=True,
              help="Input convention of a plain state-dict teacher (bgr: 3DDFA's).")
@user_errors
def cascade(generator, teacher, data, out, device, per_identity, batch_size, all_test_identities, model_name, bfm,
            teacher_format):
    """The paper's baseline: voice -> pretrained generator -> 64x64 face -> upsampled to 120x120 ->
    pretrained image -> 3DMM teacher, no joint training."""
    from v2m_data.shards import open_dataset
    from v2m_models.cascade import predict_cascade

    identities = None
    if all_test_identities:
        identities = [str(x) for x in open_dataset(data).split("test").identities["name"]]
    result = predict_cascade(generator, teacher, data, out, device=device, per_identity=per_identity,
                             batch_size=batch_size, identities=identities, model_name=model_name, bfm=bfm,
                             teacher_format=teacher_format)
    click.echo(result.summary())


__all__ = ["main"]


if __name__ == "__main__":  # pragma: no cover
    main()
