"""A static HTML report of a predictions file: tables, charts and rendered faces.

:func:`write_report` scores a predictions file (:func:`v2m_bench.scoring.score`, the same numbers
as ``v2m-bench score``), keeping the per-vertex point-to-plane errors of those registrations
(each mesh is registered once; the mean face's come with its cached scores), and writes a folder::

    OUT/index.html            the page (inline CSS and a small inline sort script; no network)
    OUT/scores.json           the summary (Report.to_json)
    OUT/per_identity.csv      one row per identity (Report.to_csv)
    OUT/img/*.png             the figures

The page shows

- the score table: each metric with its 95 % bootstrap interval, beside the optional baseline
  file (with relative change and paired-bootstrap p-value), the mean-face predictor and the
  paper's three models (``PAPER_RESULTS``);
- one bar chart per metric with the intervals;
- cumulative error curves of the per-vertex point-to-plane error, as the NoW benchmark draws them
  (x: threshold in mm, y: fraction of vertices whose error is at most x), for each model;
- the mean per-vertex error drawn on the BFM mean face (front and profile, a colour bar in mm),
  and the six part regions;
- the best, median and worst identities by RMSE: prediction and reference side by side (shaded
  grey) and the signed error drawn on the prediction;
- the per-identity table (click a column header to sort);
- the provenance (fingerprints of the references and predictions, BFM md5, metric definition
  version) and, with few identities, a caveat beside the intervals.

Averages over vertices are macro averages like the metrics: each identity weighs the same, and
the predictions of an identity share its weight. Rendering is offscreen
(:mod:`v2m_bench.render` and matplotlib's Agg canvas); every name taken from a file is
HTML-escaped.
"""

from __future__ import annotations

import dataclasses
import html
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ValidationError
from .fileio import atomic_path, write_text
from .scoring import METRIC_NAMES, METRIC_UNITS, PAPER_RESULTS, ScoreConfig, VertexErrorAccumulator, VertexErrors

__all__ = ["write_report", "VertexErrors", "vertex_errors", "PAPER_COLUMNS"]

#: Paper columns of the score table, in order (keys of ``PAPER_RESULTS``).
PAPER_COLUMNS = ("baseline", "supervised", "unsupervised")

_METRIC_LABELS = {
    "ER": "ER (ear to ear)",
    "FR": "FR (forehead)",
    "MR": "MR (mid-face)",
    "CR": "CR (cheek)",
    "ARE_mean": "ARE mean",
    "NME": "NME (68 keypoints)",
    "RMSE": "RMSE (ICP point-to-plane)",
    "RMSE_v2v": "RMSE vertex-to-vertex (Kabsch)",
    "RMSE_left_eye": "RMSE left eye",
    "RMSE_right_eye": "RMSE right eye",
    "RMSE_nose": "RMSE nose",
    "RMSE_mouth": "RMSE mouth",
    "RMSE_left_cheek": "RMSE left cheek",
    "RMSE_right_cheek": "RMSE right cheek",
    "RMSE_v2v_left_eye": "RMSE vertex-to-vertex, left eye",
    "RMSE_v2v_right_eye": "RMSE vertex-to-vertex, right eye",
    "RMSE_v2v_nose": "RMSE vertex-to-vertex, nose",
    "RMSE_v2v_mouth": "RMSE vertex-to-vertex, mouth",
    "RMSE_v2v_left_cheek": "RMSE vertex-to-vertex, left cheek",
    "RMSE_v2v_right_cheek": "RMSE vertex-to-vertex, right cheek",
}

#: Region colours of the region figure (the colours of docs/img/regions_*.png).
_REGION_COLOURS = {
    "left_eye": (0.12, 0.47, 0.71),
    "right_eye": (0.17, 0.63, 0.17),
    "nose": (0.84, 0.15, 0.16),
    "mouth": (0.58, 0.40, 0.74),
    "left_cheek": (1.00, 0.50, 0.05),
    "right_cheek": (0.09, 0.75, 0.81),
}
_GREY = (0.78, 0.78, 0.78)

#: Series colours of the charts: this model, the baseline file, the mean face, the paper's models.
_SERIES_COLOURS = {"model": "#1f77b4", "baseline": "#ff7f0e", "chance": "#7f7f7f", "paper": "#c7c7c7"}

#: The two views of every face figure: (file suffix, title, yaw in degrees).
_VIEWS = (("front", "front", 0.0), ("profile", "seen from the subject's left", -90.0))


# ------------------------------------------------------------------------------ per-vertex errors
def vertex_errors(rows, references, model, *, config: ScoreConfig | None = None, keep=(), row_identity=None) -> VertexErrors:
    """Register every row to its identity's reference and accumulate the per-vertex errors.

    Parameters
    ----------
    rows : Predictions or any object with ``identity`` and ``to_vertices(model, indices)``
        The meshes to register.
    references : References
    model : MorphableModel
    config : ScoreConfig, optional
        ``chunk_size``, ``with_scale``, ``device`` and ``progress`` are used.
    keep : iterable of int
        Rows whose distances and registered mesh are returned in ``kept``.
    row_identity : array of str, optional
        Identities of the rows (default ``rows.identity``).

    Returns
    -------
    VertexErrors
    """
    from .metrics.icp import icp_scores
    from .formats import check_face_meshes
    from .fileio import progress
    from .scoring import iter_chunks

    config = config or ScoreConfig()
    ids = np.asarray(rows.identity if row_identity is None else row_identity).astype(str)
    ref_pos = references.index()
    missing = sorted(set(ids.tolist()) - set(ref_pos))
    if missing:
        raise ValidationError(f"identities not in the references: {', '.join(missing[:5])}", key="identity")
    ref_index = np.array([ref_pos[i] for i in ids], dtype=np.int64)
    acc = VertexErrorAccumulator(ids, model.n_vertices)
    keep = set(int(k) for k in keep)
    kept = {}
    order = np.argsort(ref_index, kind="stable")
    bar = progress(total=len(ids), desc="per-vertex errors", unit="mesh", enabled=config.progress)
    try:
        for chunk in iter_chunks(len(order), config.chunk_size):
            sel = order[chunk]
            used, local = np.unique(ref_index[sel], return_inverse=True)
            pv = check_face_meshes(rows.to_vertices(model, sel), model, path=getattr(rows, "path", None), rows=sel)
            rv = check_face_meshes(references.to_vertices(model, used), model, path=references.path, rows=used)
            res, _ = icp_scores(pv, rv, model.triangles, None, group=local, with_scale=config.with_scale,
                                device=config.device, engine=config.engine, return_distances=True)
            acc.add(sel, res.distances, res.rmse)
            for j, row in enumerate(sel.tolist()):
                if row in keep:
                    aligned = res.scale[j] * pv[j].astype(np.float64) @ res.rotation[j].T + res.translation[j]
                    kept[row] = {"distances": res.distances[j].copy(), "aligned": aligned,
                                 "reference": np.asarray(rv[local[j]], dtype=np.float64)}
            bar.update(len(sel))
    finally:
        bar.close()
    return acc.result(kept)


# ------------------------------------------------------------------------------------- figures
def _figure(width: float, height: float, dpi: int = 100):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi)


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", metadata={"Software": None})
    return path


def _bar_chart(path: Path, name: str, series: list[tuple[str, str, float, float, float]]) -> Path:
    """One metric: bars (label, colour key, value, ci_low, ci_high); NaN bounds draw no interval."""
    fig = _figure(3.6, 2.7)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(series))
    vals = np.array([s[2] for s in series], dtype=np.float64)
    lo = np.array([s[3] for s in series], dtype=np.float64)
    hi = np.array([s[4] for s in series], dtype=np.float64)
    colours = [_SERIES_COLOURS[s[1]] for s in series]
    ax.bar(x, vals, color=colours, edgecolor=["#555555" if s[1] == "paper" else c for s, c in zip(series, colours)], width=0.7)
    has = np.isfinite(lo) & np.isfinite(hi)
    if has.any():
        err = np.stack([vals - lo, hi - vals])[:, has]
        ax.errorbar(x[has], vals[has], yerr=np.clip(err, 0, None), fmt="none", ecolor="black", capsize=4, lw=1.2)
    ax.set_xticks(x)
    # labels of at most 18 characters fit the fixed bottom margin; the table names the series in full
    ax.set_xticklabels([s[0] if len(s[0]) <= 18 else s[0][:17] + "\u2026" for s in series], rotation=30, ha="right", fontsize=7)
    unit = METRIC_UNITS[name]
    ax.set_title(_METRIC_LABELS[name] + (f" ({unit})" if unit else ""), fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="y", color="#dddddd", lw=0.6)
    ax.set_axisbelow(True)
    # fixed margins that hold the rotated series labels: tight_layout measured every text and took
    # about half of each chart's time (a report draws one chart per metric)
    fig.subplots_adjust(left=0.17, right=0.97, top=0.89, bottom=0.3)
    return _save(fig, path)


def _curve_chart(path: Path, curves: list[tuple[str, str, VertexErrors]]) -> tuple[Path, float]:
    fig = _figure(6.0, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    xmax = max(c[2].quantile(0.995) for c in curves)
    xmax = float(np.ceil(max(xmax, 4 * curves[0][2].bin_mm) * 10) / 10)
    for label, key, ve in curves:
        k = int(np.ceil(xmax / ve.bin_mm))
        x = np.arange(k + 1) * ve.bin_mm
        y = np.concatenate([[0.0], np.cumsum(ve.hist[:k])])
        ax.plot(x, y, color=_SERIES_COLOURS[key], lw=1.8, label=f"{label} (median {ve.quantile(0.5):.2f} mm)")
    ax.set_xlim(0, xmax)
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("error threshold (mm): |point-to-plane distance| after ICP")
    ax.set_ylabel("fraction of vertices")
    ax.grid(color="#dddddd", lw=0.6)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path), xmax


def _camera(v, yaw, size):
    from .render import fit_camera, view_rotation

    r = view_rotation(yaw=yaw)
    s, t = fit_camera(v, r, (size, size), 0.04)
    return r, s, t


def _render(v, tri, colours, cam, size, *, shaded=True, nearest=False):
    from .render import render_mesh

    r, s, t = cam
    kw = dict(ambient=0.55) if colours is not None else {}
    return render_mesh(v, tri, colors=colours, rotation=r, scale=s, translation=t, image_size=(size, size),
                       shading="lambert" if shaded else "none", color_mode="nearest" if nearest else "interpolate",
                       **kw).image


def _colour_values(values, cmap, norm):
    return np.asarray(cmap(norm(np.asarray(values, dtype=np.float64))))[:, :3]


def _heatmap(path: Path, model, values, vmax: float, size: int) -> Path:
    """Mean per-vertex error on the mean face, front and profile, with a colour bar (mm)."""
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    cmap = matplotlib.colormaps["inferno"]
    norm = Normalize(0.0, vmax, clip=True)
    col = _colour_values(values, cmap, norm)
    fig = _figure(6.4, 3.4)
    axes = [fig.add_axes((0.01 + 0.43 * i, 0.02, 0.42, 0.9)) for i in range(2)]
    for ax, (_, title, yaw) in zip(axes, _VIEWS):
        ax.imshow(_render(model.mean, model.triangles, col, _camera(model.mean, yaw, size), size))
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    cax = fig.add_axes((0.89, 0.1, 0.03, 0.75))
    fig.colorbar(ScalarMappable(norm, cmap), cax=cax, extend="max").set_label("mean |error| (mm)", fontsize=8)
    cax.tick_params(labelsize=7)
    return _save(fig, path)


def _regions_figure(path: Path, model, regions, region_rmse: dict, size: int) -> Path:
    from matplotlib.patches import Patch

    from .topology import REGION_NAMES

    col = np.tile(np.array(_GREY), (model.n_vertices, 1))
    for name in REGION_NAMES:
        col[regions[name]] = _REGION_COLOURS[name]
    fig = _figure(6.4, 3.6)
    axes = [fig.add_axes((0.0 + 0.34 * i, 0.02, 0.34, 0.9)) for i in range(2)]
    for ax, (_, title, yaw) in zip(axes, _VIEWS):
        ax.imshow(_render(model.mean, model.triangles, col, _camera(model.mean, yaw, size), size, nearest=True))
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    handles = [Patch(color=_REGION_COLOURS[n], label=f"{n.replace('_', ' ')}: {region_rmse[n]:.3f} mm") for n in REGION_NAMES]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False, title="part RMSE", title_fontsize=8)
    return _save(fig, path)


def _case_figure(path: Path, model, case: dict, vmax: float, size: int) -> Path:
    """Prediction (registered) and reference, shaded grey, and the signed error on the prediction."""
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    cmap = matplotlib.colormaps["RdBu_r"]
    norm = Normalize(-vmax, vmax, clip=True)
    col = _colour_values(case["distances"], cmap, norm)
    fig = _figure(7.4, 5.0)
    titles = ("prediction (registered)", "reference", "signed error on the prediction")
    for row, (_, view_title, yaw) in enumerate(_VIEWS):
        cam = _camera(case["reference"], yaw, size)
        imgs = (
            _render(case["aligned"], model.triangles, None, cam, size),
            _render(case["reference"], model.triangles, None, cam, size),
            _render(case["aligned"], model.triangles, col, cam, size),
        )
        for c, img in enumerate(imgs):
            ax = fig.add_axes((0.005 + 0.29 * c, 0.51 - 0.49 * row, 0.28, 0.44))
            ax.imshow(img)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(titles[c], fontsize=8)
            if c == 0:
                ax.text(-0.02, 0.5, view_title, rotation=90, va="center", ha="right", fontsize=8, transform=ax.transAxes)
    cax = fig.add_axes((0.9, 0.12, 0.025, 0.72))
    fig.colorbar(ScalarMappable(norm, cmap), cax=cax, extend="both").set_label(
        "signed point-to-plane distance (mm); + = in front of the reference", fontsize=7)
    cax.tick_params(labelsize=7)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------- HTML
def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _num(v) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.4f}"


def _ci(m) -> str:
    if m is None or not (np.isfinite(m.ci_low) and np.isfinite(m.ci_high)):
        return "n/a"
    return f"[{m.ci_low:.4f}, {m.ci_high:.4f}]"


def _td(text: str, col: str, cls: str = "num") -> str:
    return f'<td class="{cls}" data-col="{col}">{text}</td>'


def _score_table(report, base_report, model_label, base_label) -> str:
    head = ['<th scope="col">metric</th>', f'<th scope="col">{_e(model_label)}</th>', '<th scope="col">95% CI</th>']
    if report.baseline is not None:
        head += [f'<th scope="col">{_e(base_label)} (baseline file)</th>', '<th scope="col">95% CI</th>',
                 '<th scope="col">change</th>', '<th scope="col">p</th>']
    if report.chance is not None:
        head += ['<th scope="col">mean face</th>', '<th scope="col">95% CI</th>']
    head += [f'<th scope="col" class="paper">paper: {c}</th>' for c in PAPER_COLUMNS]
    rows = []
    for name in METRIC_NAMES:
        unit = METRIC_UNITS[name]
        m = report.metrics[name]
        cells = [f'<th scope="row">{_e(name)}{f" ({unit})" if unit else ""}</th>', _td(_num(m.value), "model"),
                 _td(_ci(m), "model_ci")]
        if report.baseline is not None:
            b = report.baseline[name]
            bm = base_report.metrics[name]
            p = b["p_value"]
            floor = b.get("p_value_floor", np.nan)
            if not np.isfinite(p):
                ptxt = "n/a"
            elif np.isfinite(floor) and p <= floor * (1 + 1e-9):
                ptxt = f"&lt; 1/{int(round(1 / floor))}"
            else:
                ptxt = f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"
            chg = b["relative_change"]
            ctxt = "n/a" if not np.isfinite(chg) else f"{100 * chg:+.1f}%"
            cells += [_td(_num(bm.value), "baseline"), _td(_ci(bm), "baseline_ci"), _td(ctxt, "change"), _td(ptxt, "p")]
        if report.chance is not None:
            c = report.chance[name]
            cells += [_td(_num(c.value), "chance"), _td(_ci(c), "chance_ci")]
        cells += [_td(_num(PAPER_RESULTS[k].get(name, np.nan)), f"paper_{k}", "num paper") for k in PAPER_COLUMNS]
        sep = ' class="group-end"' if name in ("ARE_mean", "RMSE", "RMSE_right_cheek") else ""
        rows.append(f'<tr data-metric="{_e(name)}"{sep}>' + "".join(cells) + "</tr>")
    return ('<table id="scores"><thead><tr>' + "".join(head) + "</tr></thead><tbody>\n" + "\n".join(rows)
            + "\n</tbody></table>")


def _provenance_block(prov: dict) -> str:
    """What the scores were computed on (docs/metrics.md, "Comparable results")."""
    if not prov:
        return ""
    rows = []
    for k, v in prov.items():
        if isinstance(v, dict):
            v = ", ".join(f"{kk} {vv}" for kk, vv in v.items()) or "none (model made in memory)"
        rows.append(f'<tr><th scope="row">{_e(k)}</th><td data-key="{_e(k)}"><code>{_e(v)}</code></td></tr>')
    return ('<h3 id="provenance-h">Provenance</h3><p class="meta">Scores are comparable only on the same references '
            "(fingerprint), BFM and metric definition.</p>"
            '<table id="provenance"><tbody>' + "".join(rows) + "</tbody></table>")


def _identity_table(report, base_report, cases: dict) -> str:
    table = report.per_identity
    cols = ["n_predictions"] + list(METRIC_NAMES)
    head = ['<th scope="col" data-type="text">identity</th>']
    head += [f'<th scope="col" data-type="number">{_e("predictions" if c == "n_predictions" else c)}</th>' for c in cols]
    has_base = base_report is not None
    if has_base:
        head.append('<th scope="col" data-type="number">RMSE of the baseline file</th>')
    label = {v: k for k, v in cases.items()}
    rows = []
    for ident, rec in table.iterrows():
        name = _e(ident)
        tag = f' <span class="tag">{label[ident]}</span>' if ident in label else ""
        cells = [f'<td class="id" data-value="{name}">{name}{tag}</td>']
        for c in cols:
            v = float(rec[c])
            txt = str(int(v)) if c == "n_predictions" else _num(v)
            cells.append(f'<td class="num" data-col="{c}" data-value="{v!r}">{txt}</td>')
        if has_base:
            bt = base_report.per_identity
            v = float(bt.loc[ident, "RMSE"]) if ident in bt.index else float("nan")
            cells.append(f'<td class="num" data-col="baseline_RMSE" data-value="{v!r}">{_num(v)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return ('<table id="per-identity" class="sortable"><thead><tr>' + "".join(head) + "</tr></thead><tbody>\n"
            + "\n".join(rows) + "\n</tbody></table>")


_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0 auto;max-width:1200px;padding:1em 1.5em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}th,td{padding:.25em .55em;border-bottom:1px solid #e4e4e4;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}td.paper,th.paper{color:#666;background:#fafafa}
tr.group-end td,tr.group-end th{border-bottom:2px solid #bbb}thead th{border-bottom:2px solid #888;background:#f4f4f4}
table.sortable thead th{cursor:pointer;user-select:none}table.sortable th[aria-sort=ascending]::after{content:" \\25B2"}
table.sortable th[aria-sort=descending]::after{content:" \\25BC"}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em .8em;font-size:.9em}
.meta{color:#555;font-size:.9em}.grid{display:flex;flex-wrap:wrap;gap:.5em}.grid img{width:360px;height:auto}.grid.heat img{width:480px}
th[scope=row]{white-space:nowrap}
figure{margin:.6em 0}figcaption{font-size:.85em;color:#444;max-width:60em}img{max-width:100%}
.tag{font-size:.75em;background:#e8eef7;border-radius:3px;padding:0 .35em;margin-left:.3em}
.wide{overflow-x:auto}code{background:#f3f3f3;padding:0 .2em}
"""

_JS = """
(function () {
  var table = document.getElementById("per-identity");
  if (!table || !table.tHead) { return; }
  var heads = table.tHead.rows[0].cells;
  function sortBy(col) {
    var th = heads[col];
    var asc = th.getAttribute("aria-sort") !== "ascending";
    var numeric = th.getAttribute("data-type") === "number";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].getAttribute("data-value"), y = b.cells[col].getAttribute("data-value");
      var c;
      if (numeric) {
        var fx = parseFloat(x), fy = parseFloat(y);
        if (isNaN(fx)) { fx = Infinity; }
        if (isNaN(fy)) { fy = Infinity; }
        c = fx - fy;
        if (isNaN(c)) { c = 0; }
      } else {
        c = x < y ? -1 : (x > y ? 1 : 0);
      }
      return asc ? c : -c;
    });
    for (var i = 0; i < heads.length; i++) { heads[i].removeAttribute("aria-sort"); }
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    for (var j = 0; j < rows.length; j++) { body.appendChild(rows[j]); }
  }
  for (var k = 0; k < heads.length; k++) {
    heads[k].addEventListener("click", (function (col) { return function () { sortBy(col); }; })(k));
  }
  document.body.setAttribute("data-sort-ready", "1");
})();
"""


def _label(obj, fallback: str) -> str:
    name = getattr(obj, "model", None)
    if isinstance(name, str) and name:
        return name
    path = getattr(obj, "path", None)
    return Path(path).stem if path is not None else fallback


# ------------------------------------------------------------------------------------ the report
def write_report(predictions, references, out, model=None, baseline=None, config: ScoreConfig | None = None, *,
                 image_size: int = 320, regions=None) -> Path:
    """Score a predictions file and write the HTML report folder.

    Parameters
    ----------
    predictions : str, path-like or Predictions
        A predictions.h5 (docs/formats.md) or an object from :func:`~v2m_bench.formats.read_predictions`.
    references : str, path-like or References
    out : str or path-like
        Folder to write (created; files of an earlier report there are replaced).
    model : MorphableModel or path, optional
        The BFM; found as :func:`~v2m_bench.bfm.load_bfm` does if omitted.
    baseline : str, path-like or Predictions, optional
        A second predictions file shown beside the first, with relative change and paired
        bootstrap p-value (as ``v2m-bench score --baseline``).
    config : ScoreConfig, optional
        Scoring options (bootstrap, seed, chance, ...), as for :func:`~v2m_bench.scoring.score`.
    image_size : int
        Pixels (width = height) of each rendered face.
    regions : mapping, optional
        Part regions; the frozen BFM regions by default.

    Returns
    -------
    Path
        ``out/index.html``.

    Raises
    ------
    ValidationError
        As :func:`~v2m_bench.scoring.score`; also an ``out`` that is an existing file.
    """
    from .bfm import MorphableModel, load_bfm
    from .formats import read_predictions, read_references
    from .scoring import compare_tables, score

    config = config or ScoreConfig()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValidationError("exists and is not a folder", path=out)
    image_size = int(image_size)
    if image_size < 32:
        raise ValidationError(f"expected at least 32 pixels, found {image_size}", key="image_size")
    if not isinstance(model, MorphableModel):
        model = load_bfm(model)
    if regions is None:
        from .scoring import model_regions

        regions = model_regions(model)
    refs = references if hasattr(references, "to_vertices") else read_references(references)
    preds = predictions if hasattr(predictions, "to_vertices") else read_predictions(predictions)
    base = None
    if baseline is not None:
        base = baseline if hasattr(baseline, "to_vertices") else read_predictions(baseline)

    # numbers and per-vertex errors: score() once per file (the baseline without the mean face),
    # each mesh registered once; then the comparison
    report = score(preds, refs, model, config=config, regions=regions, vertex_errors=True)
    base_report = None
    if base is not None:
        base_report = score(base, refs, model, config=dataclasses.replace(config, chance=False), regions=regions,
                            vertex_errors=True)
        report.baseline = compare_tables(report.per_identity, base_report.per_identity, config)

    # best / median / worst identity by RMSE, each shown through its first utterance
    table = report.per_identity
    ranked = table["RMSE"].sort_values(kind="stable")
    names = ranked.index.tolist()
    cases = {"best": names[0], "median": names[(len(names) - 1) // 2], "worst": names[-1]}
    pred_ids = np.asarray(preds.identity).astype(str)
    utts = np.asarray(getattr(preds, "utterance", np.array([""] * len(pred_ids)))).astype(str)
    case_rows = {}
    for key, ident in cases.items():
        rows = np.flatnonzero(pred_ids == ident)
        case_rows[key] = int(rows[np.argsort(utts[rows], kind="stable")[0]])

    # per-vertex errors from the scoring; the three shown predictions registered again for their meshes
    errs = {"model": report.vertex_errors["model"]}
    shown = sorted(set(case_rows.values()))
    errs["model"].kept = vertex_errors(preds.subset(shown), refs, model, config=config, keep=range(len(shown))).kept
    errs["model"].kept = {shown[i]: v for i, v in errs["model"].kept.items()}
    if base_report is not None:
        errs["baseline"] = base_report.vertex_errors["model"]
    if report.chance is not None:
        errs["chance"] = report.vertex_errors["chance"]

    img = out / "img"
    img.mkdir(parents=True, exist_ok=True)
    model_label = _label(preds, "predictions")
    base_label = _label(base, "baseline") if base is not None else None
    series_labels = {"model": model_label, "baseline": base_label, "chance": "mean face"}

    # bar charts
    bars = []
    for name in METRIC_NAMES:
        series = [(model_label, "model", *dataclasses.astuple(report.metrics[name]))]
        if base_report is not None:
            series.append((base_label, "baseline", *dataclasses.astuple(base_report.metrics[name])))
        if report.chance is not None:
            series.append(("mean face", "chance", *dataclasses.astuple(report.chance[name])))
        series += [(f"paper {k}", "paper", PAPER_RESULTS[k][name], np.nan, np.nan) for k in PAPER_COLUMNS
                   if name in PAPER_RESULTS[k]]
        bars.append((name, _bar_chart(img / f"bars_{name}.png", name, series)))

    # curves, heat maps, regions, cases
    curve_path, xmax = _curve_chart(img / "cumulative_error.png", [(series_labels[k], k, v) for k, v in errs.items()])
    anchor = errs["chance"] if "chance" in errs else None
    vmax = float(np.quantile(anchor.mean_abs, 0.99)) if anchor is not None else float(
        max(np.quantile(v.mean_abs, 0.99) for v in errs.values()))
    vmax = max(vmax, 1e-6)
    heatmaps = [(k, _heatmap(img / f"heatmap_{k}.png", model, v.mean_abs, vmax, image_size)) for k, v in errs.items()]
    region_rmse = {n: report.metrics[f"RMSE_{n}"].value for n in regions}
    regions_path = _regions_figure(img / "regions.png", model, regions, region_rmse, image_size)
    kept = errs["model"].kept
    case_vmax = float(np.quantile(np.abs(np.concatenate([kept[r]["distances"] for r in case_rows.values()])), 0.99))
    case_vmax = max(case_vmax, 1e-6)
    case_paths = {k: _case_figure(img / f"case_{k}.png", model, kept[r], case_vmax, image_size) for k, r in case_rows.items()}

    report.to_json(out / "scores.json")
    report.to_csv(out / "per_identity.csv")

    # ---- the page
    rel = lambda p: _e(Path(p).relative_to(out).as_posix())  # noqa: E731
    parts = []
    parts.append(f"<h1>voice2mesh report: {_e(model_label)}</h1>")
    files = [f"predictions <code>{_e(getattr(preds, 'path', None) or 'in memory')}</code>",
             f"references <code>{_e(getattr(refs, 'path', None) or 'in memory')}</code>"]
    if base is not None:
        files.append(f"baseline <code>{_e(getattr(base, 'path', None) or 'in memory')}</code>")
    parts.append(f'<p class="meta">{"; ".join(files)}.<br>Identities scored: {report.n_identities}, predictions: '
                 f"{report.n_predictions}, reference identities without a prediction: {len(report.missing)}. "
                 f"Bootstrap: {config.bootstrap} resamples over identities, seed {config.seed}; ICP "
                 f"{'with' if config.with_scale else 'without'} scale.</p>")
    if report.missing:
        shown = ", ".join(_e(m) for m in report.missing[:20]) + (" ..." if len(report.missing) > 20 else "")
        parts.append(f'<p class="note">Reference identities without predictions (not scored): {shown}</p>')
    if not model.is_genuine:
        parts.append('<p class="note" id="not-genuine">The BFM files are not the public 3DDFA release (their md5 '
                     "differ): dense-mesh metrics (ARE on non-keypoint vertices, RMSE) are not comparable with the "
                     "paper's numbers.</p>")
    parts.append('<p class="note">The paper\'s columns are the numbers published for Voice2Mesh (arXiv 2104.10299) '
                 "on the real A&ndash;E test set with the genuine BFM; they are shown for orientation, not computed "
                 "here. A model is only comparable with them when scored on the same references.</p>")

    parts.append('<h2 id="scores-h">Scores</h2>')
    parts.append("<p>Macro averages over identities (each identity's predictions are averaged first) with 95 % "
                 "percentile-bootstrap intervals. Ratios (ER&ndash;NME) are unitless, RMSEs in millimetres; "
                 "lower is better. Definitions: docs/metrics.md.</p>")
    parts.append('<div class="wide">' + _score_table(report, base_report, model_label, base_label) + "</div>")
    for c in report.caveats:
        parts.append(f'<p class="note caveat">Note: {_e(c)}.</p>')
    parts.append(_provenance_block(report.provenance))
    parts.append('<p class="meta">Machine-readable: <a href="scores.json">scores.json</a>, '
                 '<a href="per_identity.csv">per_identity.csv</a>.</p>')

    parts.append('<h2 id="bars-h">Per-metric charts</h2>')
    parts.append("<p>Bars: the value; whiskers: the 95 % bootstrap interval. The paper's models (grey) have no "
                 "interval.</p>")
    parts.append('<div class="grid">' + "".join(
        f'<figure><img src="{rel(p)}" alt="bar chart of {_e(n)}" width="360" height="270"></figure>' for n, p in bars)
        + "</div>")

    parts.append('<h2 id="curves-h">Cumulative error curves</h2>')
    cur_rows = "".join(
        f"<tr><th scope=\"row\">{_e(series_labels[k])}</th>{_td(f'{v.quantile(0.5):.3f}', 'median')}"
        f"{_td(f'{v.mean:.3f}', 'mean')}{_td(f'{v.std:.3f}', 'std')}{_td(f'{100 * v.fraction_below(1.0):.1f}%', 'below1')}"
        f"{_td(f'{100 * v.fraction_below(2.0):.1f}%', 'below2')}</tr>"
        for k, v in errs.items())
    parts.append(f'<figure><img src="{rel(curve_path)}" alt="cumulative error curves" width="600" height="380">'
                 "<figcaption>Per-vertex point-to-plane error after the ICP registration of the RMSE metric (every "
                 "vertex of every prediction, identities weighted equally), drawn as the NoW benchmark does: for each "
                 f"threshold x from 0 to {xmax:.1f} mm, the fraction of vertices whose error is at most x.</figcaption>"
                 "</figure>")
    parts.append('<table id="curve-stats"><thead><tr><th>model</th><th>median (mm)</th><th>mean (mm)</th>'
                 "<th>std (mm)</th><th>&le; 1 mm</th><th>&le; 2 mm</th></tr></thead><tbody>" + cur_rows
                 + "</tbody></table>")

    parts.append('<h2 id="heat-h">Where the errors are</h2>')
    parts.append(f"<p>Mean absolute point-to-plane error of each vertex, drawn on the BFM mean face. One colour "
                 f"scale for all models: 0 to {vmax:.3f} mm"
                 + (" (the mean face's 99th percentile)" if anchor is not None else "") + ".</p>")
    parts.append('<div class="grid heat">' + "".join(
        f'<figure><img src="{rel(p)}" alt="error heat map: {_e(series_labels[k])}" width="640" height="340">'
        f"<figcaption>{_e(series_labels[k])}</figcaption></figure>" for k, p in heatmaps) + "</div>")
    parts.append(f'<figure><img src="{rel(regions_path)}" alt="the six part regions" width="640" height="360">'
                 "<figcaption>The six part regions of the part RMSE (left/right are the subject's own), with this "
                 "model's part RMSE.</figcaption></figure>")

    parts.append('<h2 id="cases-h">Best, median and worst identities</h2>')
    parts.append(f"<p>By the identity's RMSE; each shown through its first utterance. The prediction is drawn "
                 f"after its ICP registration to the reference; colour scale &plusmn;{case_vmax:.3f} mm for all "
                 "three.</p>")
    for key, p in case_paths.items():
        ident = cases[key]
        row = case_rows[key]
        parts.append(
            f'<figure class="case" data-case="{key}"><img src="{rel(p)}" alt="{key} identity" width="740" height="500">'
            f"<figcaption><b>{key}</b>: <span class=\"identity\">{_e(ident)}</span>, utterance "
            f"<code>{_e(utts[row])}</code>: RMSE of this prediction {errs['model'].rmse[row]:.4f} mm; "
            f"identity RMSE {float(table.loc[ident, 'RMSE']):.4f} mm.</figcaption></figure>")

    parts.append('<h2 id="ids-h">Per identity</h2>')
    parts.append("<p>Click a column header to sort.</p>")
    parts.append('<div class="wide">' + _identity_table(report, base_report, cases) + "</div>")

    from . import __version__

    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>voice2mesh report: {_e(model_label)}</title>\n<link rel=\"icon\" href=\"data:,\">\n"
            f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(parts)
            + f'\n<p class="meta">Written by voice2mesh {_e(__version__)} (v2m-bench report).</p>\n'
            + f"<script>{_JS}</script>\n</body>\n</html>\n")
    index = out / "index.html"
    write_text(index, page)
    return index
