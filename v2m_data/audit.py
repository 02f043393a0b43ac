"""Label-quality audit of a build: do its 3D labels carry a person's face?

:func:`label_quality` is what ``manifest.json`` stores under ``quality`` (computed by every
complete build); :func:`fidelity` compares a build of a synthetic world with its ``truth.h5``;
:func:`verdict` puts the numbers in one plain sentence; :func:`audit_figure` draws them.
``v2m-build-dataset audit OUT [--truth WORLD/truth.h5] [--out DIR]`` runs them all.

``quality``
-----------
- ``icc``: one-way random-effects ICC(1) over identities (:func:`v2m_data.labels.icc1`) of the
  per-image fits' ARE ratios ``ER``, ``FR``, ``MR``, ``CR`` (fitted shape, neutral expression)
  and of the 40 ``shape`` coefficients (mean squares summed over the coefficients); identities
  with at least two fits count. The ratios need the BFM topology (``null`` on other models). No truth is needed: a high ICC says the images of one person give
  the same face and different people different faces.
- ``images_per_identity``: identities with fits, without, and min / median / max fits per
  identity (over identities with fits).
- ``residual_normalized``, ``yaw``, ``pitch``: 5th, 50th and 95th percentiles over the fits.
- ``labels``: identities with an identity label, and the median over them of the mean
  per-coefficient spread (``identity_fit/shape_spread``) in units of the model's ``shape_std``.

``fidelity`` (synthetic worlds)
--------------------------------
Per ratio, the Pearson correlation of fitted and true values and the median absolute ratio
error (ARE) against the true face, for every image fit, for every identity label and for the
references, plus the mean face's ARE for comparison.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from v2m_bench.errors import ValidationError

from .labels import icc1, ratios_of_shapes

__all__ = ["label_quality", "fidelity", "verdict", "audit_figure", "RATIOS", "ICC_GOOD", "ICC_WEAK"]

RATIOS = ("ER", "FR", "MR", "CR")
#: ``icc.ER`` at or above: the labels carry identity; below ``ICC_WEAK``: they carry little.
ICC_GOOD = 0.75
ICC_WEAK = 0.4


def _q(x) -> dict:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return {"p5": None, "p50": None, "p95": None}
    p = np.percentile(x, [5, 50, 95])
    return {"p5": round(float(p[0]), 6), "p50": round(float(p[1]), 6), "p95": round(float(p[2]), 6)}


def _r(x):
    return None if x is None or not np.isfinite(x) else round(float(x), 6)


def label_quality(splits, model) -> dict:
    """The ``quality`` section of manifest.json over the given splits.

    Parameters
    ----------
    splits : sequence of v2m_data.shards.SplitData
        Identities are numbered per split; they are kept apart.
    model : v2m_bench.bfm.MorphableModel
        The build's model (BFM topology).

    Returns
    -------
    dict
        See the module docstring; floats rounded to 6 digits (the manifest stays byte-stable).
    """
    groups, shapes, pose, rn, counts, n_without = [], [], [], [], [], 0
    spreads, n_labels = [], 0
    std = np.asarray(model.shape_std, np.float64)
    base = 0
    for sp in splits:
        n_id = sp.n_identities
        if sp.n_images:
            ident = np.asarray(sp.images["identity"], np.int64)
            groups.append(ident + base)
            shapes.append(np.asarray(sp.fit["shape"], np.float64))
            pose.append(np.asarray(sp.fit["pose"], np.float64).reshape(-1, 3))
            rn.append(np.asarray(sp.fit["residual_normalized"], np.float64))
            c = np.bincount(ident, minlength=n_id)
        else:
            c = np.zeros(n_id, np.int64)
        counts.append(c[c > 0])
        n_without += int((c == 0).sum())
        idf = getattr(sp, "identity_fit", {}) or {}
        if "shape_spread" in idf:
            has = np.asarray(idf["n_images"]) > 0
            n_labels += int(has.sum())
            sprd = np.asarray(idf["shape_spread"], np.float64)[has] / std
            sprd = sprd[np.isfinite(sprd).all(1)]
            spreads.append(sprd.mean(axis=1) if len(sprd) else np.zeros(0))
        base += n_id
    g = np.concatenate(groups) if groups else np.zeros(0, np.int64)
    a = np.concatenate(shapes) if shapes else np.zeros((0, len(std)))
    p = np.concatenate(pose) if pose else np.zeros((0, 3))
    r = np.concatenate(rn) if rn else np.zeros(0)
    c = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    icc = {k: None for k in (*RATIOS, "shape")}
    if len(a):
        try:
            ratios = ratios_of_shapes(model, a)
        except ValidationError:  # not the BFM topology: no ratios
            ratios = None
        for k in RATIOS:
            icc[k] = None if ratios is None else _r(icc1(ratios[k], g))
        icc["shape"] = _r(icc1(a, g))
    sp_all = np.concatenate(spreads) if spreads else np.zeros(0)
    sp_all = sp_all[np.isfinite(sp_all)]
    return {
        "icc": icc,
        "n_fits": int(len(a)),
        "images_per_identity": {
            "identities_with_fits": int(len(c)),
            "identities_without_fits": n_without,
            "min": int(c.min()) if len(c) else 0,
            "median": float(np.median(c)) if len(c) else 0.0,
            "max": int(c.max()) if len(c) else 0,
        },
        "residual_normalized": _q(r),
        "yaw": _q(p[:, 0]),
        "pitch": _q(p[:, 1]),
        "labels": {
            "identities": n_labels,
            "median_spread_in_shape_std": _r(float(np.median(sp_all))) if len(sp_all) else None,
        },
    }


def verdict(quality: dict) -> str:
    """One plain sentence about ``quality["icc"]["ER"]``."""
    er = (quality.get("icc") or {}).get("ER")
    if er is None:
        return "no verdict: fewer than two identities have two or more fits"
    if er >= ICC_GOOD:
        return (
            f"labels carry identity: ICC(ER) = {er:.3f} >= {ICC_GOOD} (the fits of one person agree far "
            "more than those of different people)"
        )
    if er >= ICC_WEAK:
        return (
            f"labels carry weak identity signal: ICC(ER) = {er:.3f} (between {ICC_WEAK} and {ICC_GOOD}); "
            "prefer identity labels and references, check the detector"
        )
    return (
        f"labels carry little identity signal: ICC(ER) = {er:.3f} < {ICC_WEAK}; the landmark detector's errors "
        "swamp the face shape, do not use these fits as supervision or references"
    )


def _corr(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
        return None
    return _r(np.corrcoef(x[ok], y[ok])[0, 1])


def _block(fitted: dict, true: dict) -> dict:
    are = np.mean([np.abs(fitted[k] - true[k]) for k in RATIOS], axis=0) if len(true["ER"]) else np.zeros(0)
    return {
        "n": int(len(true["ER"])),
        "corr": {k: _corr(fitted[k], true[k]) for k in RATIOS},
        "are_median": _r(float(np.median(are))) if len(are) else None,
        "are_ER_median": _r(float(np.median(np.abs(fitted["ER"] - true["ER"])))) if len(are) else None,
    }


def fidelity(build_dir, truth_path, model) -> dict:
    """Compare a build of a synthetic world with its truth (see the module docstring).

    Parameters
    ----------
    build_dir : path
        The build folder.
    truth_path : path
        The world's ``truth.h5`` (:mod:`v2m_data.synth`).
    model : v2m_bench.bfm.MorphableModel

    Returns
    -------
    dict
        ``per_image``, ``per_identity``, ``references`` (each ``n``, ``corr`` per ratio,
        ``are_median``, ``are_ER_median``) and ``mean_face`` (the mean face's ARE against the
        same identities' truth, ``are_median``).
    """
    import h5py

    from .shards import open_dataset

    truth_path = Path(truth_path)
    if not truth_path.is_file():
        raise ValidationError("no such truth file", path=str(truth_path))
    try:
        with h5py.File(truth_path, "r") as t:
            names = [x.decode() if isinstance(x, bytes) else str(x) for x in t["identity/name"][()]]
            true_shape = np.asarray(t["identity/shape"][()], np.float64)
    except (OSError, KeyError) as e:
        raise ValidationError(f"not a synthetic-world truth file ({e})", path=str(truth_path)) from None
    by_name = {n: i for i, n in enumerate(names)}
    true_r = ratios_of_shapes(model, true_shape)
    ds = open_dataset(build_dir)
    img_f, img_t, id_f, id_t = [], [], [], []
    for split in ds.splits:
        sp = ds.split(split)
        tix = np.array([by_name.get(str(n), -1) for n in sp.identities["name"]], np.int64)
        if sp.n_images:
            ident = np.asarray(sp.images["identity"], np.int64)
            ok = tix[ident] >= 0
            img_f.append(np.asarray(sp.fit["shape"], np.float64)[ok])
            img_t.append(tix[ident][ok])
        idf = getattr(sp, "identity_fit", {}) or {}
        if "shape" in idf:
            ok = (tix >= 0) & np.isfinite(np.asarray(idf["shape"], np.float64)).all(1)
            id_f.append(np.asarray(idf["shape"], np.float64)[ok])
            id_t.append(tix[ok])

    def block(parts_f, parts_t):
        if not parts_f or not sum(len(x) for x in parts_f):
            return {"n": 0, "corr": {k: None for k in RATIOS}, "are_median": None, "are_ER_median": None}
        f = ratios_of_shapes(model, np.concatenate(parts_f))
        ti = np.concatenate(parts_t)
        return _block(f, {k: v[ti] for k, v in true_r.items()})

    out = {"per_image": block(img_f, img_t), "per_identity": block(id_f, id_t)}
    refs_path = Path(build_dir) / "references.h5"
    if refs_path.is_file():
        from v2m_bench.formats import read_references

        refs = read_references(refs_path, n_vertices=None, lazy=True, check_values=False)
        ti = np.array([by_name.get(str(n), -1) for n in refs.identity], np.int64)
        ok = ti >= 0
        if refs.shape is not None and ok.any():
            f = ratios_of_shapes(model, np.asarray(refs.shape, np.float64)[ok], np.asarray(refs.expression, np.float64)[ok])
            out["references"] = _block(f, {k: v[ti[ok]] for k, v in true_r.items()})
            mean_r = ratios_of_shapes(model, np.zeros((1, true_shape.shape[1])))
            are = np.mean([np.abs(mean_r[k][0] - true_r[k][ti[ok]]) for k in RATIOS], axis=0)
            out["mean_face"] = {"n": int(ok.sum()), "are_median": _r(float(np.median(are)))}
    return out


def audit_figure(quality: dict, path, *, fid: dict | None = None, title: str = "") -> Path:
    """Draw the audit (ICC per ratio; residual, yaw and images-per-identity summaries; with
    ``fid`` the correlation with the truth per level) to a PNG file (written atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from v2m_bench.fileio import atomic_path

    ncol = 2 if fid else 1
    fig, axes = plt.subplots(1, ncol, figsize=(5.5 * ncol, 3.6), squeeze=False)
    ax = axes[0, 0]
    keys = [*RATIOS, "shape"]
    vals = [quality["icc"].get(k) or 0.0 for k in keys]
    ax.bar(keys, vals, color=["#3b7dd8" if v >= ICC_GOOD else "#e0a030" if v >= ICC_WEAK else "#d04040" for v in vals])
    ax.axhline(ICC_GOOD, color="grey", lw=0.8, ls="--")
    ax.axhline(ICC_WEAK, color="grey", lw=0.8, ls=":")
    ax.set_ylim(min(0.0, min(vals)) - 0.05, 1.0)
    ax.set_ylabel("ICC(1) over identities")
    ipi = quality["images_per_identity"]
    ax.set_title(
        f"label consistency ({quality['n_fits']} fits, {ipi['identities_with_fits']} ids, "
        f"median {ipi['median']:g} per id)",
        fontsize=9,
    )
    if fid:
        ax = axes[0, 1]
        levels = [k for k in ("per_image", "per_identity", "references") if k in fid]
        width = 0.8 / len(levels)
        for j, lev in enumerate(levels):
            v = [fid[lev]["corr"].get(k) or 0.0 for k in RATIOS]
            ax.bar(np.arange(4) + j * width, v, width, label=f"{lev} (ARE {fid[lev]['are_median']})")
        ax.set_xticks(np.arange(4) + width * (len(levels) - 1) / 2, RATIOS)
        ax.set_ylim(-0.2, 1.0)
        ax.set_ylabel("correlation with the truth")
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title("fidelity (synthetic world)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path
