"""predictions.h5 / references.h5: round trips, validation (one line naming file and key), atomic writes."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from v2m_bench.errors import ValidationError
from v2m_bench.formats import (
    FORMAT_VERSION,
    LazyVertices,
    Predictions,
    check_coverage,
    read_predictions,
    read_references,
    write_predictions,
    write_references,
)

IDS = ["Abe", "Abe", "Abe", "Bea", "Bea", "Cid"]
UTTS = ["v1_00001", "v1_00002", "v2_00001", "x_00001", "x_00002", "y_00003"]


def _coeffs(model, n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 40)) * model.shape_std).astype(np.float32), rng.normal(size=(n, 10)).astype(np.float32)


def _hand_written(path, n_vertices=7, n=3, **over):
    """A predictions file written with plain h5py, as a user would (see docs/formats.md)."""
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as f:
        f.attrs["format"] = over.pop("format", "v2m-predictions")
        f.attrs["version"] = over.pop("version", 1)
        s = h5py.string_dtype()
        f.create_dataset("identity", data=np.array(["Abe", "Abe", "Bea"][:n], dtype=object), dtype=s)
        f.create_dataset("utterance", data=np.array(["u1", "u2", "u1"][:n], dtype=object), dtype=s)
        d = f.create_dataset("vertices", data=rng.normal(size=(n, n_vertices, 3)).astype(np.float32) * 1e5)
        d.attrs["units"] = "bfm"
    return path


# --------------------------------------------------------------------------- round trips
def test_coefficients_round_trip(tmp_path, small_model):
    a, e = _coeffs(small_model, len(IDS))
    p = write_predictions(tmp_path / "pred.h5", IDS, UTTS, shape=a, expression=e, model="supervised-v1")
    pred = read_predictions(p)
    assert pred.kind == "coefficients" and len(pred) == 6 and pred.n_vertices is None
    assert pred.identity.tolist() == IDS and pred.utterance.tolist() == UTTS
    np.testing.assert_array_equal(pred.shape, a)
    np.testing.assert_array_equal(pred.expression, e)
    assert pred.attrs["format"] == "v2m-predictions" and pred.attrs["version"] == FORMAT_VERSION
    assert pred.model == "supervised-v1"
    np.testing.assert_allclose(pred.to_vertices(small_model), small_model.vertices(a, e), rtol=1e-6)
    np.testing.assert_allclose(pred.to_vertices(small_model, indices=4), small_model.vertices(a[4], e[4]), rtol=1e-6)
    with pytest.raises(ValidationError, match="MorphableModel"):
        pred.to_vertices()


@pytest.mark.parametrize("units,factor", [("bfm", 1.0), ("mm", 1e3), ("m", 1e6)])
def test_vertices_round_trip_and_units(tmp_path, small_model, units, factor):
    rng = np.random.default_rng(2)
    v = rng.normal(size=(len(IDS), small_model.n_vertices, 3)).astype(np.float32)
    p = write_predictions(tmp_path / "v.h5", IDS, UTTS, vertices=v, units=units, n_vertices=None)
    pred = read_predictions(p, n_vertices=small_model.n_vertices)
    assert pred.kind == "vertices" and pred.units == units and pred.n_vertices == small_model.n_vertices
    assert isinstance(pred.vertices, LazyVertices) and pred.vertices.shape == v.shape
    np.testing.assert_array_equal(pred.vertices[[5, 0, 0, 3]], v[[5, 0, 0, 3]])  # any order, repeats
    np.testing.assert_allclose(pred.to_vertices(small_model), v * np.float32(factor), rtol=1e-6)
    np.testing.assert_allclose(pred.to_vertices(indices=slice(1, 3)), v[1:3] * np.float32(factor), rtol=1e-6)
    eager = read_predictions(p, n_vertices=None, lazy=False)
    assert isinstance(eager.vertices, np.ndarray)
    np.testing.assert_array_equal(eager.vertices, v)


def test_lazy_rows_chunks_and_subset(tmp_path):
    rng = np.random.default_rng(3)
    v = rng.normal(size=(6, 5, 3)).astype(np.float32)
    p = write_predictions(tmp_path / "v.h5", IDS, UTTS, vertices=v, n_vertices=5)
    pred = read_predictions(p, n_vertices=5)
    seen = []
    for pos, chunk in pred.iter_vertices(chunk_size=4):
        assert chunk.shape[0] <= 4
        np.testing.assert_array_equal(chunk, v[pos])
        seen.extend(pos.tolist())
    assert seen == list(range(6))
    sub = pred.subset([4, 1])
    assert isinstance(sub.vertices, LazyVertices)
    assert sub.identity.tolist() == ["Bea", "Abe"]
    np.testing.assert_array_equal(sub.to_vertices(), v[[4, 1]])
    np.testing.assert_array_equal(np.asarray(sub.vertices), v[[4, 1]])


def test_full_size_meshes_accepted_and_other_counts_refused(tmp_path):
    v = np.zeros((2, 53215, 3), np.float32)
    v[:, :, 0] = np.linspace(-9e4, 9e4, 53215)
    p = write_predictions(tmp_path / "full.h5", ["Abe", "Bea"], ["u", "u"], vertices=v)  # default n_vertices=53215
    pred = read_predictions(p)
    assert pred.vertices.shape == (2, 53215, 3)
    np.testing.assert_array_equal(pred.to_vertices(indices=[1]), v[[1]])
    with pytest.raises(ValidationError, match=r"vertices: expected shape \(2, 53215, 3\), found \(2, 53214, 3\)"):
        write_predictions(tmp_path / "short.h5", ["Abe", "Bea"], ["u", "u"], vertices=v[:, :-1])
    _hand_written(tmp_path / "hand.h5", n_vertices=53214)
    with pytest.raises(ValidationError, match=r"hand\.h5: vertices: expected shape \(3, 53215, 3\)"):
        read_predictions(tmp_path / "hand.h5")


def test_streaming_writer_and_compression(tmp_path):
    rng = np.random.default_rng(4)
    v = rng.normal(size=(6, 9, 3)).astype(np.float32)
    for comp in (None, "gzip", "lzf"):
        p = write_predictions(tmp_path / f"s-{comp}.h5", IDS, UTTS, vertices=(row for row in v), n_vertices=None, compression=comp)
        np.testing.assert_array_equal(read_predictions(p, n_vertices=9, lazy=False).vertices, v)
    with h5py.File(tmp_path / "s-gzip.h5") as f:
        assert f["vertices"].compression == "gzip" and f["vertices"].chunks == (1, 9, 3)
    with pytest.raises(ValidationError, match="4 vertex rows for 6"):
        write_predictions(tmp_path / "few.h5", IDS, UTTS, vertices=iter(v[:4]), n_vertices=None)
    assert not (tmp_path / "few.h5").exists()


def test_hand_written_file_with_fixed_length_strings(tmp_path):
    path = tmp_path / "hand.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format"] = np.bytes_(b"v2m-predictions")
        f.attrs["version"] = np.int32(1)
        f["identity"] = np.array([b"Abe", b"Bea"])  # fixed-length ASCII, as numpy makes them
        f["utterance"] = np.array([b"u1", b"u1"])
        f["shape"] = np.zeros((2, 40))
        f["expression"] = np.zeros((2, 10), np.float16)
    pred = read_predictions(path)
    assert pred.identity.tolist() == ["Abe", "Bea"] and pred.shape.dtype == np.float32


# --------------------------------------------------------------------------- validation on read
def _set(key, value):
    def mutate(f):
        f.attrs[key] = value

    return mutate


def _delete(key):
    def mutate(f):
        del f[key]

    return mutate


def _replace(key, data):
    def mutate(f):
        attrs = dict(f[key].attrs)
        del f[key]
        d = f.create_dataset(key, data=data)
        d.attrs.update(attrs)

    return mutate


def _nan_row(f):
    v = f["vertices"][()]
    v[2, 1, 0] = np.nan
    f["vertices"][...] = v


def _duplicate(f):
    f["utterance"][2] = "u1"
    f["identity"][2] = "Abe"


def _external_link(f):
    other = os.path.join(os.path.dirname(f.filename), "other.h5")
    with h5py.File(other, "w") as g:
        g["vertices"] = f["vertices"][()]
        g["vertices"].attrs["units"] = "bfm"
    del f["vertices"]
    f["vertices"] = h5py.ExternalLink("other.h5", "/vertices")


def _soft_link(f):
    f.move("vertices", "data")
    f["vertices"] = h5py.SoftLink("/data")


def _virtual(f):
    other = os.path.join(os.path.dirname(f.filename), "other.h5")
    data = f["vertices"][()]
    with h5py.File(other, "w") as g:
        g["vertices"] = data
    del f["vertices"]
    layout = h5py.VirtualLayout(shape=data.shape, dtype=data.dtype)
    layout[...] = h5py.VirtualSource(other, "vertices", shape=data.shape)
    f.create_virtual_dataset("vertices", layout).attrs["units"] = "bfm"


def _external_storage(f):
    data = f["vertices"][()]
    raw = os.path.join(os.path.dirname(f.filename), "raw.bin")
    data.tofile(raw)
    del f["vertices"]
    d = f.create_dataset("vertices", shape=data.shape, dtype=data.dtype, external=[(raw, 0, data.nbytes)])
    d.attrs["units"] = "bfm"


def _group(f):
    del f["utterance"]
    f.create_group("utterance")


def _both(f):
    f["shape"] = np.zeros((3, 40), np.float32)
    f["expression"] = np.zeros((3, 10), np.float32)


BAD_FILES = {
    "missing utterance": (_delete("utterance"), "utterance", "missing dataset"),
    "missing geometry": (_delete("vertices"), "shape", "missing dataset"),
    "utterance length": (_replace("utterance", np.array([b"u1", b"u2"])), "utterance", "expected 3 rows"),
    "identity not strings": (_replace("identity", np.arange(3)), "identity", "expected strings, found dtype int64"),
    "vertices int": (_replace("vertices", np.zeros((3, 7, 3), np.int32)), "vertices", "expected floating-point"),
    "vertices 2-D": (_replace("vertices", np.zeros((3, 21), np.float32)), "vertices", "expected shape (3, 7, 3)"),
    "NaN": (_nan_row, "vertices", "NaN or infinite values in 1 row(s), first at row 2"),
    "duplicate pair": (_duplicate, "utterance", "duplicate (identity, utterance) pair ('Abe', 'u1') at rows 0 and 2"),
    "wrong format": (_set("format", "v2m-references"), "format", "is 'v2m-references', expected 'v2m-predictions'"),
    "missing format": (lambda f: f.attrs.__delitem__("format"), "format", "missing file attribute"),
    "newer version": (_set("version", 2), "version", "version 2 is newer than this voice2mesh reads (1)"),
    "version not int": (_set("version", "1"), "version", "expected an integer"),
    "units cm": (lambda f: f["vertices"].attrs.__setitem__("units", "cm"), "vertices", "attribute 'units' is 'cm'"),
    "units missing": (lambda f: f["vertices"].attrs.__delitem__("units"), "vertices", "missing attribute 'units'"),
    "both kinds": (_both, "vertices", "both coefficients and vertices"),
    "external link": (_external_link, "vertices", "external link to other.h5:/vertices"),
    "soft link": (_soft_link, "vertices", "soft link to /data"),
    "virtual dataset": (_virtual, "vertices", "virtual dataset"),
    "external storage": (_external_storage, "vertices", "external storage is refused"),
    "group": (_group, "utterance", "expected a dataset, found a group"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_read_refuses_bad_file_naming_file_and_key(tmp_path, case):
    mutate, key, message = BAD_FILES[case]
    path = _hand_written(tmp_path / "pred.h5")
    assert read_predictions(path, n_vertices=7).kind == "vertices"  # valid before the change
    with h5py.File(path, "r+") as f:
        mutate(f)
    with pytest.raises(ValidationError) as info:
        read_predictions(path, n_vertices=7)
    text = str(info.value)
    assert text.startswith(f"{path}: {key}: "), text
    assert message in text
    assert "\n" not in text and info.value.path == str(path) and info.value.key == key


def test_truncated_file(tmp_path):
    path = _hand_written(tmp_path / "pred.h5", n_vertices=500)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValidationError, match=r"pred\.h5: cannot open the HDF5 file \(truncated or damaged\?\)"):
        read_predictions(path, n_vertices=None)


def test_plain_text_and_missing_file(tmp_path):
    path = tmp_path / "pred.h5"
    path.write_text("identity,utterance\nAbe,u1\n")
    with pytest.raises(ValidationError, match=r"pred\.h5: not an HDF5 file$"):
        read_predictions(path)
    with pytest.raises(FileNotFoundError):
        read_predictions(tmp_path / "nope.h5")
    with pytest.raises(ValidationError, match="is a folder"):
        read_predictions(tmp_path)


def test_check_values_false_defers_nan_check_to_to_vertices(tmp_path):
    path = _hand_written(tmp_path / "pred.h5")
    with h5py.File(path, "r+") as f:
        _nan_row(f)
    pred = read_predictions(path, n_vertices=7, check_values=False)
    pred.to_vertices(indices=[0, 1])  # clean rows read fine
    with pytest.raises(ValidationError, match="vertices: NaN"):
        pred.to_vertices(indices=[2])


# --------------------------------------------------------------------------- validation on write; atomicity
@pytest.mark.parametrize(
    "kwargs,key,message",
    [
        (dict(utterance=UTTS[:-1]), "utterance", "expected 6 rows"),
        (dict(utterance=["u"] * 6), "utterance", "duplicate (identity, utterance) pair ('Abe', 'u')"),
        (dict(identity=[""] + IDS[1:]), "identity", "row 0 is an empty string"),
        (dict(shape=np.zeros((6, 39))), "shape", "expected shape (6, 40), found (6, 39)"),
        (dict(expression=None), "expression", "coefficients need both"),
        (dict(shape=np.full((6, 40), np.inf)), "shape", "NaN or infinite"),
        (dict(vertices=np.zeros((6, 4, 3))), "vertices", "not both"),
        (dict(attrs={"version": 3}), "version", "is set by the writer"),
        (dict(model=3), "model", "expected a str"),
        (dict(compression="zstd"), "compression", "unknown compression"),
    ],
)
def test_write_validation_keeps_existing_file(tmp_path, small_model, kwargs, key, message):
    a, e = _coeffs(small_model, 6)
    path = write_predictions(tmp_path / "pred.h5", IDS, UTTS, shape=a, expression=e, model="old")
    before = path.read_bytes()
    args = dict(identity=IDS, utterance=UTTS, shape=a, expression=e)
    args.update(kwargs)
    with pytest.raises(ValidationError) as info:
        write_predictions(path, args.pop("identity"), args.pop("utterance"), **args)
    assert f"{key}: " in str(info.value) and message in str(info.value)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["pred.h5"]  # no temporary file left behind


def test_failure_while_streaming_leaves_old_file_and_no_temp(tmp_path):
    v = np.ones((6, 4, 3), np.float32) * 1e5
    path = write_predictions(tmp_path / "pred.h5", IDS, UTTS, vertices=v, n_vertices=4, model="old")

    def rows():
        yield from v[:3]
        bad = v[3].copy()
        bad[0, 0] = np.nan
        yield bad

    with pytest.raises(ValidationError, match=r"vertices: NaN or infinite values in 1 row\(s\), first at row 3"):
        write_predictions(path, IDS, UTTS, vertices=rows(), n_vertices=4, model="new")

    def broken():
        yield v[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_predictions(path, IDS, UTTS, vertices=broken(), n_vertices=4, model="new")
    assert read_predictions(path, n_vertices=4).model == "old"
    assert sorted(os.listdir(tmp_path)) == ["pred.h5"]


def test_written_file_is_not_private(tmp_path, small_model):
    a, e = _coeffs(small_model, 6)
    old = os.umask(0o022)
    try:
        path = write_predictions(tmp_path / "pred.h5", IDS, UTTS, shape=a, expression=e)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------- references and coverage
def _refs(tmp_path, model, names=("Abe", "Bea", "Cid", "Dee")):
    a, e = _coeffs(model, len(names), seed=9)
    return write_references(
        tmp_path / "refs.h5",
        list(names),
        ["m", "f", "m", "f"][: len(names)],
        shape=a,
        expression=e,
        source_image=[f"{n}/00000001.jpg" for n in names],
        fit_residual=np.arange(len(names), dtype=np.float32) + 0.5,
        selection_rule="lowest landmark residual among frontal images",
        fit_residual_units="px",
    )


def test_references_round_trip(tmp_path, small_model):
    refs = read_references(_refs(tmp_path, small_model))
    assert refs.identity.tolist() == ["Abe", "Bea", "Cid", "Dee"] and refs.gender.tolist() == ["m", "f", "m", "f"]
    assert refs.source_image[2] == "Cid/00000001.jpg"
    np.testing.assert_array_equal(refs.fit_residual, [0.5, 1.5, 2.5, 3.5])
    assert refs.selection_rule.startswith("lowest") and refs.attrs["fit_residual_units"] == "px"
    assert refs.index()["Cid"] == 2
    assert refs.to_vertices(small_model, indices=[2]).shape == (1, small_model.n_vertices, 3)
    assert refs.subset([3]).identity.tolist() == ["Dee"]


def test_references_vertices_and_validation(tmp_path):
    v = np.ones((2, 5, 3), np.float32)
    p = write_references(tmp_path / "r.h5", ["Abe", "Bea"], ["m", "f"], vertices=v, units="mm", n_vertices=5)
    refs = read_references(p, n_vertices=5)
    assert refs.units == "mm" and refs.source_image is None and refs.fit_residual is None
    np.testing.assert_array_equal(refs.to_vertices(), v * 1000)
    with pytest.raises(ValidationError, match=r"gender: row 1 is 'x'; expected 'm' or 'f'"):
        write_references(tmp_path / "r.h5", ["Abe", "Bea"], ["m", "x"], vertices=v, n_vertices=5)
    with pytest.raises(ValidationError, match=r"identity: duplicate identity 'Abe' at rows 0 and 1"):
        write_references(tmp_path / "r.h5", ["Abe", "Abe"], ["m", "f"], vertices=v, n_vertices=5)
    with pytest.raises(ValidationError, match=r"fit_residual: expected shape \(2,\)"):
        write_references(tmp_path / "r.h5", ["Abe", "Bea"], ["m", "f"], vertices=v, n_vertices=5, fit_residual=[1.0])
    with pytest.raises(ValidationError, match=r"r\.h5: format: is 'v2m-references', expected 'v2m-predictions'"):
        read_predictions(p, n_vertices=5)
    with h5py.File(p, "r+") as f:
        f["gender"][1] = "F"
    with pytest.raises(ValidationError, match=r"r\.h5: gender: row 1 is 'F'"):
        read_references(p, n_vertices=5)


def test_check_coverage(tmp_path, small_model):
    refs = read_references(_refs(tmp_path, small_model))
    a, e = _coeffs(small_model, 6)
    pred = read_predictions(write_predictions(tmp_path / "p.h5", IDS, UTTS, shape=a, expression=e))
    cov = check_coverage(pred, refs)
    assert cov.missing == ("Dee",) and cov.n_covered == 3 and cov.n_references == 4 and not cov.complete
    assert cov.predictions_per_identity == {"Abe": 3, "Bea": 2, "Cid": 1}
    assert "3/4" in str(cov) and "1 missing: 'Dee'" in str(cov)
    with pytest.raises(ValidationError, match=r"p\.h5: identity: no predictions for 1 reference identities: 'Dee'"):
        check_coverage(tmp_path / "p.h5", tmp_path / "refs.h5", strict=True)
    stranger = Predictions(identity=["Abe", "Zed"], utterance=["u", "u"], shape=a[:2].tolist(), expression=e[:2])  # lists are fine
    with pytest.raises(ValidationError, match=r"identity: 1 identities are not in the references .*: 'Zed'"):
        check_coverage(stranger, refs)
    full = check_coverage(pred.subset([0, 3, 5]), refs.subset([0, 1, 2]), strict=True)
    assert full.complete and full.missing == ()
