"""Reference 3D faces of the benchmark's test identities, chosen automatically and reproducibly.

The paper picked each test identity's reference fit by hand. This module replaces that by a rule
(and still accepts a hand-made choice through an override file).

Two modes (``ReferenceRule.mode``, ``v2m-build-dataset --reference-rule``):

- ``identity`` (default): the reference is the identity's label stored in the shards
  (:mod:`v2m_data.labels`: a robust aggregate of the shape coefficients over its accepted fits)
  with the neutral expression (expression coefficients 0, the model's reference expression).
  Its provenance (``source_image``) names every image used, joined by ``;``; ``fit_residual`` is
  their mean residual. It needs at least one candidate (step 1 below): **an identity without a
  frontal, well-fitted image gets no reference** and is recorded in the manifest with that reason
  (never silently). The label averages away most of a detector's per-image noise.
- ``image``: one picked image's fit, by the rule below.

Selection rule (``ReferenceRule`` defaults)
-------------------------------------------
For a test identity with valid image fits ``i`` (shape ``a_i`` (40,), expression ``b_i`` (10,),
pose ``(yaw_i, pitch_i, roll_i)`` in degrees as in :mod:`v2m_data.shards`, normalised landmark
residual ``r_i``):

1. **Candidates** ``C``: the frontal, well-fitted fits: ``|yaw_i| <= 15``, ``|pitch_i| <= 15`` and
   ``r_i <= 0.05``. An identity without candidates gets no reference (recorded in the manifest).
2. **Robust shape**: ``m = median_{i in C} a_i``, per coefficient.
3. **Score** of each candidate, with ``sigma`` / ``tau`` the model's shape / expression standard
   deviations (``bfm.shape_std``, ``bfm.expression_std``)::

       d_shape(i) = sqrt( mean_k ((a_ik - m_k) / sigma_k)^2 )     # k = 1..40
       d_expr(i)  = sqrt( mean_j (b_ij / tau_j)^2 )                # j = 1..10, 0 = the model's
                                                                   #   reference (neutral) expression
       score(i)   = d_shape(i) + 1.0 * d_expr(i)

4. **Choice**: the candidate with the lowest score; ties broken by the lower ``r_i``, then the
   smaller image path (code-point order).

The same text (with the actual thresholds and weight) is written to ``references.h5`` as the
``selection_rule`` attribute (:meth:`ReferenceRule.describe`).

Override file
-------------
CSV (header ``identity,image``; ``identity`` a VGGFace name or VoxCeleb1 id, ``image`` an image id
such as ``00000123`` or a path ``Name/00000123.jpg``) or JSON (``{"identity": "image", ...}``).
An overridden identity takes that image's fit whatever its pose or residual (if the fit is valid);
an override naming an unknown identity or image is recorded as a failure and the rule decides.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from v2m_bench.errors import ValidationError

__all__ = [
    "ReferenceRule",
    "ReferenceChoice",
    "select_references",
    "read_overrides",
    "build_references",
    "FIT_RESIDUAL_UNITS",
]

FIT_RESIDUAL_UNITS = "px, mean distance between the 68 landmarks and the projected fitted keypoints"


@dataclass(frozen=True)
class ReferenceRule:
    """Thresholds and weight of the selection rule (see the module docstring).

    Attributes
    ----------
    max_yaw, max_pitch : float
        Degrees; candidates have ``|yaw| <= max_yaw`` and ``|pitch| <= max_pitch``.
    max_residual : float
        Candidates have ``residual_normalized <= max_residual``.
    expression_weight : float
        Weight of ``d_expr`` in the score.
    mode : {"identity", "image"}
        The identity's label (default) or the one picked image's fit (see the module docstring).
    """

    max_yaw: float = 15.0
    max_pitch: float = 15.0
    max_residual: float = 0.05
    expression_weight: float = 1.0
    mode: str = "identity"

    def __post_init__(self):
        if self.mode not in ("identity", "image"):
            raise ValidationError(f"must be 'identity' or 'image', found {self.mode!r}", key="ReferenceRule.mode")
        for k in ("max_yaw", "max_pitch", "max_residual", "expression_weight"):
            v = getattr(self, k)
            if not np.isfinite(v) or v < 0:
                raise ValidationError(f"expected a finite number >= 0, found {v!r}", key=f"ReferenceRule.{k}")

    def describe(self) -> str:
        """The rule as one paragraph (written as references.h5 ``selection_rule``)."""
        if self.mode == "identity":
            return (
                "v2m_data.references rule v2 (identity): an identity with at least one valid fit with |yaw| <= "
                f"{self.max_yaw:g} deg, |pitch| <= {self.max_pitch:g} deg and residual_normalized <= "
                f"{self.max_residual:g} takes its identity label (identity_fit/shape of its shard: the "
                "aggregate of its accepted fits, see identity_fit attributes) with expression 0; "
                "source_image lists the images used, fit_residual is their mean residual; a manual "
                "override file, when given, wins for the identities it names (that image's fit)."
            )
        return (
            "v2m_data.references rule v1: among the identity's valid fits with |yaw| <= "
            f"{self.max_yaw:g} deg, |pitch| <= {self.max_pitch:g} deg and residual_normalized <= "
            f"{self.max_residual:g} (candidates C), take m = per-coefficient median of the shape "
            "coefficients over C; score(i) = sqrt(mean_k((shape_ik - m_k)/shape_std_k)^2) + "
            f"{self.expression_weight:g} * sqrt(mean_j(expression_ij/expression_std_j)^2) with the "
            "model's coefficient standard deviations; choose the lowest score, ties by lower "
            "residual_normalized then smaller image path; a manual override file, when given, wins "
            "for the identities it names."
        )


@dataclass
class ReferenceChoice:
    """Per identity: the chosen fit row (-1: none), how it was chosen, and the candidates' scores.

    Attributes
    ----------
    row : (I,) int64
        Chosen row of the fit arrays, or -1.
    how : list of str
        ``"rule"``, ``"override"`` or ``""`` (none).
    reason : list of str
        Why there is no reference (``""`` when there is one).
    score : (M,) float64
        Score of each fit (NaN for non-candidates).
    n_candidates : (I,) int64
    """

    row: np.ndarray
    how: list
    reason: list
    score: np.ndarray
    n_candidates: np.ndarray
    notes: list = field(default_factory=list)


def select_references(
    identity,
    shape,
    expression,
    pose,
    residual_normalized,
    shape_std,
    expression_std,
    *,
    n_identities: int,
    paths=None,
    rule: ReferenceRule = ReferenceRule(),
    overrides: dict | None = None,
) -> ReferenceChoice:
    """Apply the selection rule to the fits of a set of identities.

    Parameters
    ----------
    identity : (M,) int
        Identity number (0..n_identities-1) of each fit.
    shape : (M, 40) float; expression : (M, 10) float
        Fitted coefficients (BFM units).
    pose : (M, 3) float
        ``(yaw, pitch, roll)`` in degrees.
    residual_normalized : (M,) float
        Normalised landmark residual (NaN for invalid fits, which are never chosen).
    shape_std : (40,) float; expression_std : (10,) float
        Model coefficient standard deviations.
    n_identities : int
    paths : (M,) str, optional
        Image paths (tie-break; default: the row order).
    rule : ReferenceRule
    overrides : dict, optional
        Identity number -> fit row chosen by hand (takes precedence).

    Returns
    -------
    ReferenceChoice
    """
    ident = np.asarray(identity, np.int64)
    a = np.asarray(shape, np.float64)
    b = np.asarray(expression, np.float64)
    p = np.asarray(pose, np.float64).reshape(-1, 3)
    rn = np.asarray(residual_normalized, np.float64)
    m = len(ident)
    if a.shape[0] != m or b.shape[0] != m or p.shape[0] != m or rn.shape != (m,):
        raise ValidationError("identity, shape, expression, pose and residual_normalized differ in length", key="fits")
    sig = np.asarray(shape_std, np.float64).reshape(1, -1)
    tau = np.asarray(expression_std, np.float64).reshape(1, -1)
    finite = np.isfinite(a).all(1) & np.isfinite(b).all(1) & np.isfinite(p).all(1) & np.isfinite(rn)
    with np.errstate(invalid="ignore"):
        cand = (
            finite
            & (np.abs(p[:, 0]) <= rule.max_yaw)
            & (np.abs(p[:, 1]) <= rule.max_pitch)
            & (rn <= rule.max_residual)
        )
    order_key = np.arange(m) if paths is None else np.asarray([str(x) for x in paths], dtype=object)
    score = np.full(m, np.nan)
    row = np.full(n_identities, -1, np.int64)
    how = [""] * n_identities
    reason = [""] * n_identities
    n_cand = np.zeros(n_identities, np.int64)
    # group the candidate rows by identity (stable: rows stay in file order inside a group)
    cidx = np.flatnonzero(cand)
    groups = np.split(cidx[np.argsort(ident[cidx], kind="stable")], np.cumsum(np.bincount(ident[cidx], minlength=n_identities))[:-1])
    d_expr = np.sqrt(np.mean((b / tau) ** 2, axis=1))
    for n in range(n_identities):
        rows = groups[n]
        n_cand[n] = len(rows)
        if len(rows) == 0:
            n_valid = int(np.sum(finite & (ident == n)))
            reason[n] = (
                f"no frontal well-fitted image ({n_valid} valid fits, none with |yaw| <= {rule.max_yaw:g}, "
                f"|pitch| <= {rule.max_pitch:g}, residual_normalized <= {rule.max_residual:g})"
                if n_valid
                else "no valid image fit"
            )
            continue
        med = np.median(a[rows], axis=0)
        d_shape = np.sqrt(np.mean(((a[rows] - med) / sig) ** 2, axis=1))
        s = d_shape + rule.expression_weight * d_expr[rows]
        score[rows] = s
        keys = [(s[j], rn[rows[j]], order_key[rows[j]]) for j in range(len(rows))]
        best = min(range(len(rows)), key=lambda j: keys[j])
        row[n] = rows[best]
        how[n] = "rule"
    for n, r in (overrides or {}).items():
        if not finite[r]:
            continue  # the caller checks this and records it
        row[n] = r
        how[n] = "override"
        reason[n] = ""
    return ReferenceChoice(row=row, how=how, reason=reason, score=score, n_candidates=n_cand)


def read_overrides(path: str | os.PathLike) -> dict:
    """Read a manual reference override file: identity -> image (CSV or JSON).

    Parameters
    ----------
    path : path
        ``.json``: an object ``{"identity": "image"}``; anything else: CSV with columns
        ``identity`` and ``image`` (a header row is required; ``image_id`` is accepted for ``image``).

    Returns
    -------
    dict of str -> str

    Raises
    ------
    ValidationError
        Missing or malformed file, repeated identity, empty value (naming the file and row).
    """
    path = Path(path)
    if not path.is_file():
        raise ValidationError("no such reference override file", path=str(path))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ValidationError(f"cannot read: {e}", path=str(path)) from None
    out: dict = {}
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValidationError(f"not valid JSON ({e})", path=str(path)) from None
        if not isinstance(obj, dict):
            raise ValidationError("expected a JSON object mapping identity -> image", path=str(path))
        for k, v in obj.items():
            if not isinstance(v, str) or not v.strip() or not str(k).strip():
                raise ValidationError(f"identity {k!r}: expected a non-empty image string, found {v!r}", path=str(path))
            out[str(k).strip()] = v.strip()
        return out
    sample = text.split("\n", 1)[0]
    delim = "\t" if "\t" in sample else ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delim)
    cols = {(c or "").strip().lower(): c for c in (reader.fieldnames or [])}
    icol = cols.get("identity")
    vcol = cols.get("image", cols.get("image_id"))
    if icol is None or vcol is None:
        raise ValidationError(
            f"expected a header with columns 'identity' and 'image', found {reader.fieldnames!r}", path=str(path)
        )
    for lineno, rec in enumerate(reader, start=2):
        k, v = (rec.get(icol) or "").strip(), (rec.get(vcol) or "").strip()
        if not k and not v:
            continue
        if not k or not v:
            raise ValidationError(f"line {lineno}: empty identity or image", path=str(path))
        if k in out:
            raise ValidationError(f"line {lineno}: identity {k!r} repeated", path=str(path))
        out[k] = v
    return out


def _resolve_overrides(overrides: dict, names, vox_ids, identity, image_ids, paths, valid):
    """Map override entries to (identity number -> row) plus notes for the ones that fail."""
    by_name = {str(n): i for i, n in enumerate(names)}
    by_vox = {str(v): i for i, v in enumerate(vox_ids)}
    resolved, notes = {}, []
    for key, image in sorted(overrides.items()):
        n = by_name.get(key, by_vox.get(key))
        if n is None:
            notes.append({"stage": "reference", "identity": key, "item": image, "reason": "override ignored: not a test identity of this build"})
            continue
        stem = Path(image).stem
        rows = [
            r
            for r in np.flatnonzero(identity == n)
            if image in (str(paths[r]), str(image_ids[r])) or (stem == str(image_ids[r]) and "/" not in image)
        ]
        if not rows:
            notes.append({"stage": "reference", "identity": str(names[n]), "item": image, "reason": "override ignored: no fitted image with that id (automatic choice used)"})
            continue
        if not valid[rows[0]]:
            notes.append({"stage": "reference", "identity": str(names[n]), "item": image, "reason": "override ignored: that image's fit is not valid (automatic choice used)"})
            continue
        resolved[n] = int(rows[0])
    return resolved, notes


def build_references(
    split,
    out: str | os.PathLike,
    shape_std,
    expression_std,
    *,
    rule: ReferenceRule = ReferenceRule(),
    overrides: dict | None = None,
    attrs: dict | None = None,
) -> dict:
    """Choose and write ``references.h5`` for the identities of a test split.

    Parameters
    ----------
    split : v2m_data.shards.SplitData
        The test split of a build (``open_dataset(OUT).split("test")``).
    out : path
        ``references.h5`` to write (v2m_bench format, with ``source_image``, ``fit_residual`` and
        the ``selection_rule`` attribute). Not written when no identity has a reference.
    shape_std, expression_std : array
        The model's coefficient standard deviations.
    rule : ReferenceRule
    overrides : dict, optional
        From :func:`read_overrides`.
    attrs : dict, optional
        Further file attributes.

    Returns
    -------
    dict
        ``{"written": bool, "n_references": int, "n_overrides": int, "failures": [...],
        "chosen": [{"identity", "image", "how"}]}``; failures have ``stage="reference"``.
    """
    from v2m_bench.formats import write_references

    names = split.identities["name"]
    vox_ids = split.identities["vox_id"]
    genders = split.identities["gender"]
    n_id = len(names)
    img, fit = split.images, split.fit
    m = split.n_images
    identity = img["identity"].astype(np.int64) if m else np.zeros(0, np.int64)
    paths = img["path"] if m else np.zeros(0, object)
    image_ids = img["image_id"] if m else np.zeros(0, object)
    if m:
        sh, ex, pose, rn = fit["shape"], fit["expression"], fit["pose"], fit["residual_normalized"]
        valid = np.isfinite(sh).all(1) & np.isfinite(ex).all(1) & np.isfinite(rn)
    else:
        sh, ex, pose, rn = np.zeros((0, len(shape_std))), np.zeros((0, len(expression_std))), np.zeros((0, 3)), np.zeros(0)
        valid = np.zeros(0, bool)
    resolved, notes = _resolve_overrides(overrides or {}, names, vox_ids, identity, image_ids, paths, valid)
    choice = select_references(
        identity, sh, ex, pose, rn, shape_std, expression_std, n_identities=n_id, paths=paths, rule=rule, overrides=resolved
    )
    failures = list(notes)
    idfit = getattr(split, "identity_fit", {}) or {}
    use_label = rule.mode == "identity"
    if use_label and "shape" not in idfit:  # shards written without labels: the single-image rule
        use_label = False
        rule = dataclasses.replace(rule, mode="image")
    label_rows: dict = {}
    if use_label:
        in_label = np.asarray(fit.get("in_identity_label", np.zeros(m, bool)), bool) if m else np.zeros(0, bool)
        for n in range(n_id):
            if choice.row[n] >= 0 and choice.how[n] == "rule":
                rows = np.flatnonzero(in_label & (identity == n))
                if len(rows) and np.isfinite(idfit["shape"][n]).all():
                    label_rows[n] = rows
    keep = []
    for n in range(n_id):
        if choice.row[n] < 0:
            failures.append({"stage": "reference", "identity": str(names[n]), "item": "", "reason": f"no reference: {choice.reason[n]}"})
        elif str(genders[n]) not in ("m", "f"):
            failures.append({"stage": "reference", "identity": str(names[n]), "item": "", "reason": f"no reference: gender {genders[n]!r} is not 'm' or 'f'"})
        else:
            keep.append(n)
    rows = choice.row[keep]
    chosen = []
    ref_shape = np.asarray(sh, np.float64)[rows].reshape(len(keep), np.shape(sh)[1])
    ref_expr = np.asarray(ex, np.float64)[rows].reshape(len(keep), np.shape(ex)[1])
    source = [str(paths[r]) for r in rows]
    resid = np.asarray(fit["residual"][rows], np.float64) if len(keep) else np.zeros(0)
    how = [choice.how[n] for n in keep]
    for j, (n, r) in enumerate(zip(keep, rows)):
        if n in label_rows:
            used = label_rows[n]
            ref_shape[j] = idfit["shape"][n]
            ref_expr[j] = 0.0
            source[j] = ";".join(str(paths[u]) for u in used)
            resid[j] = float(np.mean(np.asarray(fit["residual"], np.float64)[used]))
            how[j] = "identity"
            chosen.append({"identity": str(names[n]), "images": [str(paths[u]) for u in used], "how": "identity"})
        else:
            chosen.append({"identity": str(names[n]), "image": str(paths[r]), "how": choice.how[n]})
    result = {
        "written": False,
        "n_references": len(keep),
        "n_overrides": sum(1 for h in how if h == "override"),
        "failures": failures,
        "chosen": chosen,
        "selection_rule": rule.describe(),
    }
    if keep:
        write_references(
            out,
            [str(names[n]) for n in keep],
            [str(genders[n]) for n in keep],
            shape=ref_shape,
            expression=ref_expr,
            source_image=source,
            fit_residual=resid,
            selection_rule=rule.describe(),
            fit_residual_units=FIT_RESIDUAL_UNITS,
            attrs={"how_chosen": ",".join(how), **(attrs or {})},
        )
        result["written"] = True
    return result
