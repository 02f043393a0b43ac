"""Crafted, broken and misplaced checkpoints: one-line refusals, never code run, never a trained
checkpoint replaced by accident (docs/safety.md)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from click.testing import CliRunner

from tests.models.test_predict import trained  # noqa: F401 - the module-scoped fixture
from tests.models.test_train_supervised import sup_config
from v2m_bench.errors import ValidationError
from v2m_models.predict import predict, resolve_predictor
from v2m_models.supervised import train_supervised
from v2m_models.training import load_checkpoint, save_checkpoint


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_a_checkpoint_holding_code_is_refused_plainly_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    bad = tmp_path / "evil.pt"
    torch.save({"format": "v2m-checkpoint", "payload": _Evil(marker)}, bad)
    with pytest.raises(ValidationError) as e:
        load_checkpoint(bad)
    msg = _one_line(e)
    assert "evil.pt: holds pickled code or objects other than weights (posix.system)" in msg
    assert "refused" in msg and "weights_only" not in msg and "False" not in msg
    assert not marker.exists()


def test_empty_and_truncated_checkpoints_say_why(trained, tmp_path):  # noqa: F811
    _data, ck = trained
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValidationError, match=r"empty\.pt: is empty \(0 bytes\), not a checkpoint"):
        load_checkpoint(empty)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    with pytest.raises(ValidationError, match=r"cut\.pt: cannot read the checkpoint \(truncated, damaged") as e:
        load_checkpoint(cut)
    _one_line(e)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"version": "abc"}, r"version: expected an integer, found 'abc'"),
        ({"modules": {"model": [1, 2]}}, r"modules\.model: expected a dict of tensors, found list"),
        ({"iteration": "3"}, r"iteration: expected an int, found str"),
        ({"predictor": 5}, r"predictor: expected a str, found int"),
    ],
)
def test_crafted_fields_are_one_line_errors(trained, tmp_path, change, match):  # noqa: F811
    _data, ck = trained
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, {**load_checkpoint(ck), **change})
    with pytest.raises(ValidationError, match=match) as e:
        load_checkpoint(bad)
    _one_line(e)


def test_nan_weights_are_blamed_on_the_checkpoint(trained, tmp_path):  # noqa: F811
    data, ck = trained
    c = load_checkpoint(ck)
    name = next(k for k, t in c["modules"]["model"].items() if t.is_floating_point())
    c["modules"]["model"][name] = torch.full_like(c["modules"]["model"][name], math.nan)
    bad = tmp_path / "nan.pt"
    save_checkpoint(bad, c)
    with pytest.raises(ValidationError, match=rf"nan\.pt: modules\.model\.{name}: holds NaN or infinite weights"):
        predict(bad, data, tmp_path / "p.h5", device="cpu")
    assert not (tmp_path / "p.h5").exists()


def test_a_checkpoint_without_weights_cannot_predict(trained, tmp_path):  # noqa: F811
    data, ck = trained
    bad = tmp_path / "empty-modules.pt"
    save_checkpoint(bad, {**load_checkpoint(ck), "modules": {}})
    with pytest.raises(ValidationError, match=r"empty-modules\.pt: modules: holds no weights") as e:
        predict(bad, data, tmp_path / "p.h5", device="cpu")
    _one_line(e)


@pytest.mark.parametrize("ref", ["v2m_models.predict:resolve_predictor", "v2m_models.training:load_checkpoint",
                                 "v2m_models.supervised:SupervisedConfig"])
def test_a_predictor_naming_another_function_is_refused(trained, ref):  # noqa: F811
    _data, ck = trained
    with pytest.raises(ValidationError, match="only v2m_models.<module>:load_predictor loaders are used") as e:
        resolve_predictor({**load_checkpoint(ck), "predictor": ref}, torch.device("cpu"), path=ck)
    _one_line(e)


def _reshaped(ck, tmp_path):
    c = load_checkpoint(ck)
    name = next(k for k, t in c["modules"]["model"].items() if t.ndim == 2)
    c["modules"]["model"][name] = torch.zeros(3, 3)
    bad = tmp_path / "shape.pt"
    save_checkpoint(bad, c)
    return bad


def test_wrong_tensor_shapes_in_predict_are_one_line(trained, tmp_path):  # noqa: F811
    from v2m_cli.predict import main

    data, ck = trained
    bad = _reshaped(ck, tmp_path)
    res = CliRunner().invoke(main, ["--checkpoint", str(bad), "--data", str(data), "--out", str(tmp_path / "p.h5"),
                                    "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and "shape.pt: modules: the checkpoint does not fit the 'supervised' model" in res.output


def test_wrong_tensor_shapes_on_resume_are_one_line(trained, tmp_path):  # noqa: F811
    data, ck = trained
    bad = _reshaped(ck, tmp_path)
    before = bad.read_bytes()
    with pytest.raises(ValidationError, match=r"shape\.pt: modules\.model: the weights do not fit the model") as e:
        train_supervised(sup_config(data, iterations=4), bad, resume=True)
    _one_line(e)
    assert bad.read_bytes() == before


# ------------------------------------------------------------------ v2m-train --out
def _train_args(data, out, *extra):
    return ["supervised", "--data", str(data), "--out", str(out), "--iterations", "1", "--batch-size", "4", "--device",
            "cpu", "--workers", "0", "--min-frames", "16", "--max-frames", "40", "--channels", "64,16,16,16,16,16",
            "--val-every", "0", "--target-fallback", "--no-progress", *extra]


def test_train_refuses_to_replace_a_checkpoint_without_resume_or_overwrite(trained, tmp_path):  # noqa: F811
    from v2m_cli.train import main

    data, ck = trained
    out = tmp_path / "mine.pt"
    out.write_bytes(ck.read_bytes())
    res = CliRunner().invoke(main, _train_args(data, out))
    assert res.exit_code == 2, res.output
    assert res.output == f"error: {out}: exists; pass --resume to continue that run or --overwrite to replace it\n"
    assert out.read_bytes() == ck.read_bytes()
    res = CliRunner().invoke(main, _train_args(data, out, "--overwrite"))
    assert res.exit_code == 0, res.output
    assert out.read_bytes() != ck.read_bytes() and load_checkpoint(out)["iteration"] == 1


def test_train_checks_the_first_channel_width_before_training(trained, tmp_path):  # noqa: F811
    from v2m_cli.train import main

    data, _ck = trained
    args = _train_args(data, tmp_path / "x.pt")
    args[args.index("--channels") + 1] = "32,16,16,16,16,16"
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert res.output == ("error: --channels: the first width is the number of log-mel bands of the build's features "
                          "(64), got 32\n")
    assert not (tmp_path / "x.pt").exists()
