"""Fitting 68 image landmarks to the 3DMM (batched classic alternating fit).

``fit_landmarks`` turns 68-point iBUG landmarks (pixels) into BFM shape/expression coefficients
and a weak-perspective pose, for thousands of faces at once.

Camera model and frames
-----------------------
Weak perspective (scaled orthographic projection). For a model point ``X`` (BFM units, the BFM's
canonical frame: +x the subject's left, +y up, +z out of the face) the image point in pixels is::

    u = s * (R @ X)[0] + t[0]
    v = t[1] - s * (R @ X)[1]          # image y points down, the camera frame's y points up

i.e. ``p = s * diag(1, -1) @ R[:2] @ X + t``. ``R`` (a proper rotation, det +1) maps the BFM frame to
a camera frame with x to the image right, y to the image top and z towards the viewer, so the
identity is a frontal face, upright, looking at the camera, with the subject's left on the image
right. ``s`` is in pixels per BFM unit; ``t`` is the pixel position of the BFM origin. Internally
the fit works on ``(u, -v)`` so that the camera frame is right-handed; :func:`project` applies the
model above.

Objective
---------
With ``X_k(c)`` the model keypoints for coefficients ``c = (shape, expression)``, ``o_k`` the
landmarks in the y-up frame and ``L`` the RMS radius of the mean face's 68 keypoints about their
centroid (BFM units; about 66,000 for the BFM), the coefficient steps minimise, at fixed pose::

    (1 / L^2) * sum_k | (o_k - t) / s - R[:2] @ X_k(c) |^2
        + shape_lambda * sum_i ((shape_i - mu_i) / sigma_i)^2
        + expression_lambda * sum_j ((expression_j - nu_j) / tau_j)^2

with ``sigma = bfm.shape_std``, ``tau = bfm.expression_std`` (the 3DDFA statistics of fitted
coefficients) and prior centres ``mu`` = 0 (``FitConfig.shape_prior="zero"``, the default: the
BFM's own mean face; ``"model"`` uses ``bfm.shape_mean``) and ``nu = bfm.expression_mean``
(``expression_prior="model"``, the default: the average fitted expression of the 3DDFA training
fits, a typical face in a photograph; ``"zero"`` centres it on the model's neutral ``u_exp``
offset). The data term is measured in the model's own units (pixel error divided by the scale) and
relative to the face size, so the lambdas are dimensionless and the same face gives the same
coefficients at any image resolution. Read as a MAP estimate, ``lambda = (noise / L)^2`` for an
isotropic landmark noise of ``noise`` BFM units per coordinate; the default 1e-3 corresponds to
about 3 % of ``L`` (~2 mm, ~3 px on a 200 px face). In face3d's pixel-space convention
(``|x - sRX - t|^2 + lambda' * sum (c/sigma)^2``) this is ``lambda' = lambda * L^2 * s^2``.

Algorithm (the classic alternating scheme, FACTS.md section 3, batched)
-----------------------------------------------------------------------
Start from the prior centres. Each of ``n_iter`` iterations (default 4) does, for all faces at
once:

1. camera: the affine camera (2x4) from the 68 2D-3D pairs by the Gold Standard algorithm
   (isotropic normalisation of both point sets, linear least squares, denormalisation; done on
   the centred second moments); its 2x3 part ``M`` is decomposed as ``s * R[:2]`` by the polar
   decomposition (the closest matrix with orthonormal rows, closed form for the 2x2 ``M M^T``),
   ``R[2] = R[0] x R[1]``; then ``s`` and ``t`` are re-estimated by least squares for that rotation;
2. (``contour=True``) the jaw landmarks 0-7 / 9-16 of the side turned away from the camera are
   re-assigned to the silhouette (below);
3. expression: ridge least squares for the 10 expression coefficients with the pose and shape fixed;
4. shape: the same for the 40 shape coefficients with the new expression.

(``solver="joint"`` solves 3-4 together as one 50-coefficient ridge problem; both reach the same
fixed point.) A last camera step follows so that the pose returned belongs to the coefficients
returned. The least-squares problems are solved through their normal equations: the keypoint rows
of the bases never change, so the Gram blocks ``G[a, b] = sum_k A_k[a]^T A_k[b]`` (a, b = x, y, z;
``A_k`` the 3x50 basis rows of keypoint ``k``, whitened by the statistics; the ridge folded in) and
``H[a, b] = sum_k A_k[a]^T X0_k[b]`` are precomputed once per model (:class:`KeypointSystem`). The
normal matrix for rotation ``R`` is ``sum_ab Q_ab G[a, b]`` with ``Q = R[:2]^T R[:2]`` (symmetric:
a (B, 6) x (6, 2500) matrix product), the right-hand side two small products, so an iteration is a
few matrix products plus batched 10x10 and 40x40 (or 50x50) solves. A relative 1e-10 diagonal
jitter in the solves guards rank-deficient systems (no prior and coefficients that the keypoints
do not determine). Work is float64 and deterministic; chunks of faces run on parallel threads.
``benchmarks/bench_fit.py`` checks the answers against a plain per-face implementation with
``np.linalg.lstsq`` on the full keypoint systems (agreement ~1e-9).

Refinement (``refine > 0``)
---------------------------
The alternation converges slowly where the coefficients can mimic a change of pose (weak or no
prior: with zero noise and no prior on the BFM, 4 iterations leave ~0.3 px, 400 still ~0.05 px),
and its fixed point is not the least-squares optimum because the camera step is the affine fit
made orthonormal, not the best weak-perspective pose. ``refine`` Gauss-Newton steps on all 56
parameters at once (rotation increment, log scale, translation, coefficients; one batched 56x56
solve each, step halving when a step does not lower the objective) follow the classic iterations
and reach the optimum of the pixel objective ``sum_k |s R[:2] X_k + t - o_k|^2 + s^2 L^2 * ridge``:
on synthetic BFM faces ``refine=2`` lowers the dense-mesh error from 2.1 % to 1.7 % of the face
width, at ~2-3x the time. With no noise and no prior it reproduces the keypoints to ~1e-12 px in
5 steps.

Contour landmarks
-----------------
iBUG jaw landmarks of a turned face lie on the silhouette, not on fixed mesh vertices. With
``contour=True``, each jaw landmark j in 0-7, 9-16 has a precomputed line of candidate vertices
on the mean shape: the front-most vertex (max z) in each of ``contour_candidates - 1`` bins of x
between ``contour_inner * |x_j|`` and ``|x_j|`` (towards the face's centre) on the horizontal band
``|y - y_j| < contour_band * face height`` of the mean face, plus the original vertex first. At each
iteration, for the side whose outward axis (+/- x) points away from the camera, each landmark
takes the candidate (with the current coefficients) farthest outwards along the image direction
of that axis; the side turned towards the camera keeps the fixed vertices. The chin (8) is fixed.
The re-assignment moves the pose, so the default is 8 iterations with it.

Validity
--------
A face whose landmarks contain NaN/inf, whose landmark bounding box has no area, whose fit is
non-finite or whose ``residual_normalized`` exceeds ``FitConfig.max_residual`` (default 0.1;
random points give > 0.2) gets ``valid=False`` and a one-line reason in ``FitResult.reason``
(NaN outputs in the first three cases); the other faces are fitted as usual and no exception is
raised. ``converged`` says the fitted model's 68 standard keypoints, projected, moved less than
``tol`` x sqrt(w*h) (the landmarks' bounding box; default 2e-3, 0.4 px on a 200 px face) in the
last iteration.

Accuracy (tests/data/test_fitting.py)
--------------------------------
Synthetic BFM faces (random shape/expression drawn from the BFM statistics, yaw +/-40, pitch and
roll +/-20 degrees, ~200 px wide, 1 px Gaussian noise per coordinate), default settings: mean
landmark residual 1.09-1.10 x the noise's own mean distance (tested < 1.25 x); projected fitted
keypoints within 0.81-0.86 px of the noise-free landmarks (tested < 1 px); 3-D keypoints within
1.7-1.8 % of the face width (tested < 2.5 %); rotation within 1.2-1.4 degrees (tested < 2.5);
dense mesh RMS error 2.0-2.3 % of the face width (tested < 3 %), 1.2 % after the best isotropic
scale (tested < 1.6 % and < 0.8 x the mean face's 1.7 %) -- weak perspective leaves the overall
size to the prior, and the first shape component, which trades off against the scale, is not
recovered (correlation ~0.1; components 2-4 and the leading expressions are, 0.6-0.9). Zero
noise, no prior, a model with full-rank bases: keypoints reproduced to < 1e-4 px (float32 model)
and coefficients to < 1e-4 sigma. Human iBUG annotations (``shared/samples/faces``):
``residual_normalized`` 0.016 (frontal) and 0.034 (a ~35-degree yaw; 0.027 with ``contour``),
tested < 0.05.

Speed (benchmarks/bench_fit.py; 2-core Xeon shared with other jobs, load 0.7-3, provisional)
-------------------------------------------------------------------------------------------
Defaults (4 iterations), 20,000 faces: 10,300-11,200 faces/s on one thread, 10,400-18,600 on two
(two threads only help when the other jobs leave a core free); the per-face lstsq reference
417-452 faces/s: 24-27x on one thread, 23-43x on two. ``refine=2`` 3,700-8,300 faces/s;
``contour=True`` (8 iterations) 2,600-4,500 faces/s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from v2m_bench.bfm import MorphableModel
from v2m_bench.errors import ValidationError
from v2m_bench.fileio import progress as progress_bar

from .threads import one_blas_thread

__all__ = [
    "FitConfig",
    "FitResult",
    "KeypointSystem",
    "fit_landmarks",
    "project",
    "read_pts",
    "N_LANDMARKS",
    "CONTOUR_LANDMARKS",
]

N_LANDMARKS = 68
#: iBUG jaw landmarks that ``contour=True`` may move to the silhouette (the chin, 8, stays).
CONTOUR_LANDMARKS = np.array([0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16])


# ---------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class FitConfig:
    """Settings of :func:`fit_landmarks`.

    Attributes
    ----------
    n_iter : int or None, default None
        Iterations of (camera, expression, shape); a final camera step follows. None: 4 (face3d's
        default; 99.8 % of synthetic faces then meet ``tol``), or 8 with ``contour=True`` (the
        re-assigned jaw points move the pose more; 4 iterations rarely meet ``tol`` there).
    shape_lambda, expression_lambda : float, default 1e-3
        Dimensionless ridge weights (see the module docstring: ``(noise / L)^2``). 0 disables.
    shape_prior : {"zero", "model"}, default "zero"
        Centre of the shape prior: 0 (the BFM mean face) or ``bfm.shape_mean``.
    expression_prior : {"model", "zero"}, default "model"
        Centre of the expression prior: ``bfm.expression_mean`` or 0.
    solver : {"alternating", "joint"}, default "alternating"
        Expression then shape (classic), or both in one 50-coefficient solve.
    contour : bool, default False
        Re-assign the jaw landmarks of the side turned away to the silhouette.
    contour_candidates : int, default 12
        Candidate vertices per jaw landmark (including the landmark's own vertex).
    contour_inner : float, default 0.5
        Candidates span ``[contour_inner * |x_j|, |x_j|]`` of the mean face (BFM x).
    contour_band : float, default 0.02
        Half-height of each candidate line's band, relative to the mean keypoints' height.
    tol : float, default 2e-3
        ``converged`` when the projected keypoints moved less than ``tol * sqrt(w*h)`` in the last
        iteration.
    max_residual : float, default 0.1
        Faces with ``residual_normalized`` above this are marked invalid (a diverged or wrong fit).
    chunk_size : int, default 512
        Faces solved together (memory ~ chunk_size * 40 kB).
    refine : int, default 0
        Gauss-Newton steps on all parameters (pose and coefficients jointly) after the classic
        iterations; the classic alternation converges slowly when the coefficients can mimic
        pose changes (weak or no regularisation). 0: the classic algorithm alone.
    n_threads : int or None, default None
        Threads working on chunks at once (the linear algebra releases the GIL); None: the CPUs
        this process may use. Results do not depend on it.
    single_thread_blas : bool, default True
        While fitting, limit BLAS to one thread (:func:`v2m_data.threads.one_blas_thread`; needs
        ``threadpoolctl``, nothing is limited without it; the process-wide limit is
        restored afterwards). The matrix products here are small; threaded BLAS only spins
        against the chunk threads (it doubled the CPU time in benchmarks/bench_fit.py).
    """

    n_iter: int | None = None
    shape_lambda: float = 1e-3
    expression_lambda: float = 1e-3
    shape_prior: Literal["zero", "model"] = "zero"
    expression_prior: Literal["model", "zero"] = "model"
    solver: Literal["alternating", "joint"] = "alternating"
    contour: bool = False
    contour_candidates: int = 12
    contour_inner: float = 0.5
    contour_band: float = 0.02
    tol: float = 2e-3
    max_residual: float = 0.1
    chunk_size: int = 512
    refine: int = 0
    n_threads: int | None = None
    single_thread_blas: bool = True

    @property
    def iterations(self) -> int:
        """``n_iter`` resolved (4, or 8 with ``contour``)."""
        return self.iterations_for(self.contour)

    def iterations_for(self, contour: bool) -> int:
        """``n_iter`` resolved for a fit with or without contour re-assignment."""
        if self.n_iter is not None:
            return int(self.n_iter)
        return 8 if contour else 4

    def __post_init__(self):
        def bad(name, why):
            raise ValidationError(f"{why}, found {getattr(self, name)!r}", key=f"FitConfig.{name}")

        if self.n_iter is not None and (not isinstance(self.n_iter, (int, np.integer)) or self.n_iter < 1):
            bad("n_iter", "expected None or an integer >= 1")
        for name in ("shape_lambda", "expression_lambda"):
            v = getattr(self, name)
            if not np.isfinite(v) or v < 0:
                bad(name, "expected a finite number >= 0")
        if self.shape_prior not in ("zero", "model"):
            bad("shape_prior", "expected 'zero' or 'model'")
        if self.expression_prior not in ("zero", "model"):
            bad("expression_prior", "expected 'zero' or 'model'")
        if self.solver not in ("alternating", "joint"):
            bad("solver", "expected 'alternating' or 'joint'")
        if not isinstance(self.contour_candidates, (int, np.integer)) or self.contour_candidates < 2:
            bad("contour_candidates", "expected an integer >= 2")
        if not 0.0 <= self.contour_inner < 1.0:
            bad("contour_inner", "expected a number in [0, 1)")
        if not self.contour_band > 0:
            bad("contour_band", "expected a number > 0")
        if not self.tol > 0:
            bad("tol", "expected a number > 0")
        if not self.max_residual > 0:
            bad("max_residual", "expected a number > 0")
        if not isinstance(self.chunk_size, (int, np.integer)) or self.chunk_size < 1:
            bad("chunk_size", "expected an integer >= 1")
        if not isinstance(self.refine, (int, np.integer)) or self.refine < 0:
            bad("refine", "expected an integer >= 0")
        if self.n_threads is not None and (not isinstance(self.n_threads, (int, np.integer)) or self.n_threads < 1):
            bad("n_threads", "expected None or an integer >= 1")


# ---------------------------------------------------------------------------------------- result
@dataclass(eq=False)
class FitResult:
    """Output of :func:`fit_landmarks` for B faces (float64 arrays).

    Attributes
    ----------
    shape : ndarray, (B, 40)
        Shape coefficients (3DDFA BFM units, as ``MorphableModel.vertices`` takes them).
    expression : ndarray, (B, 10)
        Expression coefficients.
    scale : ndarray, (B,)
        Pixels per BFM unit.
    rotation : ndarray, (B, 3, 3)
        Rotation from the BFM frame to the camera frame (x right, y up, z to the viewer), det +1.
    translation : ndarray, (B, 2)
        Pixel position (x right, y down) of the BFM origin; see :func:`project`.
    residual : ndarray, (B,)
        Mean distance (pixels) between the landmarks and the projected fitted keypoints.
    residual_normalized : ndarray, (B,)
        ``residual / sqrt(w * h)`` with w, h the size of the landmarks' bounding box.
    converged : ndarray of bool, (B,)
        The last iteration moved the projected keypoints by less than ``tol * sqrt(w*h)``.
    valid : ndarray of bool, (B,)
        False for faces that could not be fitted (see ``reason``); their arrays may be NaN.
    reason : list of str, length B
        Empty for valid faces, else one line saying why.
    keypoint_vertices : ndarray of int64, (B, 68)
        The mesh vertex each landmark was fitted to (differs from ``bfm.keypoints`` on the jaw
        only with ``contour=True``).
    n_iter : int
        Iterations run.
    """

    shape: np.ndarray
    expression: np.ndarray
    scale: np.ndarray
    rotation: np.ndarray
    translation: np.ndarray
    residual: np.ndarray
    residual_normalized: np.ndarray
    converged: np.ndarray
    valid: np.ndarray
    reason: list
    keypoint_vertices: np.ndarray
    n_iter: int

    def __len__(self) -> int:
        return int(self.scale.shape[0])

    def project(self, points) -> np.ndarray:
        """Project (B, N, 3) model-frame points (BFM units) to (B, N, 2) pixels with the fitted pose."""
        return project(points, self.scale, self.rotation, self.translation)


def project(points, scale, rotation, translation) -> np.ndarray:
    """Weak-perspective projection to pixels (image y down).

    Parameters
    ----------
    points : array_like, (B, N, 3)
        Points in the BFM frame, BFM units.
    scale : array_like, (B,)
        Pixels per BFM unit.
    rotation : array_like, (B, 3, 3)
        BFM frame -> camera frame (x right, y up, z to the viewer).
    translation : array_like, (B, 2)
        Pixel position of the BFM origin.

    Returns
    -------
    ndarray, (B, N, 2), float64
        ``u = s (R X)_x + t_x``, ``v = t_y - s (R X)_y``.
    """
    points = np.asarray(points, dtype=np.float64)
    rotation = np.asarray(rotation, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    translation = np.asarray(translation, dtype=np.float64)
    cam = np.einsum("bnj,bij->bni", points, rotation[:, :2, :])
    out = scale[:, None, None] * cam
    out[..., 1] *= -1.0
    return out + translation[:, None, :]


# ---------------------------------------------------------------------------------------- model
_Q6 = (np.array([0, 1, 2, 0, 0, 1]), np.array([0, 1, 2, 1, 2, 2]))  # upper triangle of a 3x3


def _sym6(t):
    """(3, 3, ...) -> (6, ...): the diagonal blocks, then t[a, b] + t[b, a] for a < b.

    ``sum_ab Q_ab t[a, b] == sum_m Q[_Q6][m] * _sym6(t)[m]`` for a symmetric Q.
    """
    i, j = _Q6
    off = i != j
    out = t[i, j].copy()
    out[off] += t[j[off], i[off]]
    return out


@dataclass(frozen=True, eq=False)
class KeypointSystem:
    """Everything the fit needs from the model, precomputed once (about 300 kB).

    Build with :meth:`from_model`; pass it to :func:`fit_landmarks` instead of the model to reuse
    it across calls. Coefficients inside are whitened (``w = c / std``); ``n = 50``.

    Attributes
    ----------
    keypoints : (68,) int64 vertex ids.
    mean : (68, 3) mean-face keypoints, BFM units.
    basis : (68, 3, n) whitened basis rows at the keypoints (shape 40 then expression 10).
    basis_t : (n, 204) ``basis`` flattened and transposed (``X = w @ basis_t + mean``).
    basis_centroid : (n, 3), mean_centroid : (3,)
        Keypoint centroid ``w @ basis_centroid + mean_centroid``.
    std : (n,) coefficient standard deviations (shape_std, expression_std).
    prior : (n,) whitened prior centre.
    lambdas : (n,) ridge weight per coefficient times ``L^2`` (BFM units^2).
    size : float, ``L``, RMS radius of the mean keypoints (BFM units).
    fixed_basis : (68, 3, n) ``basis`` with the re-assignable jaw rows zeroed when ``contour``.
    fixed_sum : (3, n) ``fixed_basis`` summed over the keypoints.
    gram_ss, gram_es, gram_ee, gram : (6, 40*40), (6, 10*40), (6, 10*10), (6, n*n)
        ``G[a, b] = sum_k A_k[a]^T A_k[b]`` over the fixed keypoints, blocks of the whitened basis,
        folded by :func:`_sym6` so that ``sum_ab Q_ab G[a, b] = q6 @ gram``; the ridge term is
        included (``lambda/2`` on each diagonal block, as ``trace(R[:2]^T R[:2]) = 2``).
    cross : (6, n) ``H[a, b] = sum_k A_k[a]^T X0_k[b]`` folded the same way.
    lam_prior : (n,) ``lambdas * prior``.
    contour : bool
    cand_vertices : (16, K) int64 candidate vertex ids per contour landmark (column 0: own vertex).
    cand_mean : (16, K, 3); cand_basis : (16, K, 3, n) whitened.
    cand_side : (16,) +1 for the subject's left (x > 0), -1 for the right.
    n_shape : int
    solver : str
    """

    keypoints: np.ndarray
    mean: np.ndarray
    basis: np.ndarray
    basis_t: np.ndarray
    basis_centroid: np.ndarray
    mean_centroid: np.ndarray
    std: np.ndarray
    prior: np.ndarray
    lambdas: np.ndarray
    size: float
    fixed_basis: np.ndarray
    fixed_sum: np.ndarray
    gram_ss: np.ndarray
    gram_es: np.ndarray
    gram_ee: np.ndarray
    gram: np.ndarray
    cross: np.ndarray
    lam_prior: np.ndarray
    contour: bool
    cand_vertices: np.ndarray
    cand_mean: np.ndarray
    cand_basis: np.ndarray
    cand_side: np.ndarray
    n_shape: int
    solver: str

    @classmethod
    def from_model(cls, bfm: MorphableModel, config: FitConfig = FitConfig()) -> "KeypointSystem":
        """Precompute the keypoint system of ``bfm`` for ``config`` (priors, lambdas, solver, contour)."""
        kp = np.asarray(bfm.keypoints, dtype=np.int64)
        if kp.shape != (N_LANDMARKS,):
            raise ValidationError(f"expected 68 keypoints, found shape {kp.shape}", key="bfm.keypoints")
        ns, ne = bfm.n_shape, bfm.n_expression
        nc = ns + ne
        std = np.concatenate([bfm.shape_std, bfm.expression_std]).astype(np.float64)
        if not np.all(np.isfinite(std)) or np.any(std <= 0):
            raise ValidationError("coefficient standard deviations must be finite and > 0", key="bfm.shape_std")
        mean = bfm.mean[kp].astype(np.float64)
        basis = _basis_rows(bfm, kp) * std  # (68, 3, n) whitened

        centred = mean - mean.mean(0)
        size = float(np.sqrt((centred**2).sum(1).mean()))
        mu_s = bfm.shape_mean if config.shape_prior == "model" else np.zeros(ns)
        mu_e = bfm.expression_mean if config.expression_prior == "model" else np.zeros(ne)
        prior = np.concatenate([mu_s, mu_e]).astype(np.float64) / std
        lambdas = np.concatenate([np.full(ns, config.shape_lambda), np.full(ne, config.expression_lambda)])
        lambdas = lambdas * size**2

        fixed = basis.copy()
        if config.contour:
            fixed[CONTOUR_LANDMARKS] = 0.0
            cand = _contour_candidates(bfm, kp, config)
            cand_mean = bfm.mean[cand].astype(np.float64)
            cand_basis = _basis_rows(bfm, cand.reshape(-1)).reshape(*cand.shape, 3, nc) * std
            side = np.sign(mean[CONTOUR_LANDMARKS, 0])
            side[side == 0] = 1.0
        else:
            cand = np.zeros((0, 1), np.int64)
            cand_mean = np.zeros((0, 1, 3))
            cand_basis = np.zeros((0, 1, 3, nc))
            side = np.zeros(0)
        g = np.einsum("kai,kbj->abij", fixed, fixed)  # (3, 3, n, n)
        g[np.arange(3), np.arange(3)] += np.diag(lambdas / 2.0)
        h = np.einsum("kai,kb->abi", fixed, mean)  # (3, 3, n)
        g6 = _sym6(g)  # (6, n, n)
        sh, ex = slice(0, ns), slice(ns, nc)

        def flat(a):
            return np.ascontiguousarray(a.reshape(6, -1))

        return cls(
            keypoints=kp,
            mean=mean,
            basis=basis,
            basis_t=np.ascontiguousarray(basis.reshape(-1, nc).T),
            basis_centroid=np.ascontiguousarray(basis.mean(0).T),
            mean_centroid=mean.mean(0),
            std=std,
            prior=prior,
            lambdas=lambdas,
            size=size,
            fixed_basis=np.ascontiguousarray(fixed),
            fixed_sum=fixed.sum(0),
            gram_ss=flat(g6[:, sh, sh]),
            gram_es=flat(g6[:, ex, sh]),
            gram_ee=flat(g6[:, ex, ex]),
            gram=flat(g6),
            cross=flat(_sym6(h)),
            lam_prior=lambdas * prior,
            contour=bool(config.contour),
            cand_vertices=cand,
            cand_mean=cand_mean,
            cand_basis=cand_basis,
            cand_side=side,
            n_shape=ns,
            solver=config.solver,
        )

    @property
    def n_coeff(self) -> int:
        return int(self.std.shape[0])


def _basis_rows(bfm: MorphableModel, vertices: np.ndarray) -> np.ndarray:
    """(V, 3, 50) float64 rows of [shape_basis | expression_basis] at the given vertices."""
    rows = (3 * vertices[:, None] + np.arange(3)).reshape(-1)
    b = np.concatenate([bfm.shape_basis[rows], bfm.expression_basis[rows]], axis=1).astype(np.float64)
    return b.reshape(len(vertices), 3, -1)


def _contour_candidates(bfm: MorphableModel, kp: np.ndarray, config: FitConfig) -> np.ndarray:
    """(16, K) candidate vertex ids per contour landmark; column 0 is the landmark's own vertex."""
    mean = bfm.mean.astype(np.float64)
    kmean = mean[kp]
    band = config.contour_band * float(np.ptp(kmean[:, 1]))
    k = int(config.contour_candidates)
    out = np.empty((len(CONTOUR_LANDMARKS), k), np.int64)
    for row, j in enumerate(CONTOUR_LANDMARKS):
        xj, yj = kmean[j, 0], kmean[j, 1]
        side = 1.0 if xj >= 0 else -1.0
        ax = side * mean[:, 0]
        lo, hi = config.contour_inner * abs(xj), abs(xj)
        sel = np.flatnonzero((np.abs(mean[:, 1] - yj) < band) & (ax >= lo) & (ax < hi))
        out[row] = kp[j]
        if sel.size == 0:
            continue
        edges = np.linspace(lo, hi, k)  # k - 1 bins
        bins = np.clip(np.searchsorted(edges, ax[sel], side="right") - 1, 0, k - 2)
        for b in range(k - 1):
            inb = sel[bins == b]
            if inb.size:
                out[row, 1 + b] = inb[np.argmax(mean[inb, 2])]  # front-most vertex of the bin
    return out


# ---------------------------------------------------------------------------------------- fitting
def fit_landmarks(landmarks, bfm, config: FitConfig = FitConfig(), *, progress: bool = False) -> FitResult:
    """Fit BFM coefficients and a weak-perspective pose to 68-point landmarks.

    Parameters
    ----------
    landmarks : array_like, (B, 68, 2) or (B, 68, 3) (or one face without the batch axis)
        iBUG-ordered landmarks in image pixels (x right, y down). A third column (depth, e.g.
        from 3D-FAN) is accepted and ignored.
    bfm : MorphableModel or KeypointSystem
        The model; a :class:`KeypointSystem` (from ``KeypointSystem.from_model(bfm, config)``)
        skips the small precomputation. Its priors, lambdas, solver and contour settings are the
        ones it was built with (``config`` then supplies the rest).
    config : FitConfig
    progress : bool, default False
        Show a progress bar over chunks (when stderr is a terminal).

    Returns
    -------
    FitResult
        Per-face coefficients, pose, residuals and validity. Invalid faces (non-finite or
        degenerate landmarks, a diverged fit, a residual above ``config.max_residual``) do not
        raise; see ``FitResult.valid`` / ``reason``. The result does not depend on
        ``chunk_size`` or ``n_threads`` beyond floating-point rounding (~1e-12 relative).

    Raises
    ------
    ValidationError
        ``landmarks`` is not (B, 68, 2|3) or ``bfm`` is neither model nor keypoint system.
    """
    if isinstance(bfm, KeypointSystem):
        system = bfm
    elif isinstance(bfm, MorphableModel):
        system = KeypointSystem.from_model(bfm, config)
    else:
        raise ValidationError(f"expected a MorphableModel or KeypointSystem, found {type(bfm).__name__}", key="bfm")
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.ndim == 2:
        lm = lm[None]
    if lm.ndim != 3 or lm.shape[1] != N_LANDMARKS or lm.shape[2] not in (2, 3):
        raise ValidationError(f"expected shape (B, 68, 2) or (B, 68, 3), found {np.shape(landmarks)}", key="landmarks")
    obs = lm[..., :2].copy()
    obs[..., 1] *= -1.0  # y up
    n = obs.shape[0]
    nc = system.n_coeff

    coeff = np.full((n, nc), np.nan)
    scale = np.full(n, np.nan)
    rotation = np.full((n, 3, 3), np.nan)
    translation = np.full((n, 2), np.nan)
    residual = np.full(n, np.nan)
    converged = np.zeros(n, bool)
    vertices = np.tile(system.keypoints, (n, 1))
    reason = [""] * n

    finite = np.isfinite(obs).all(axis=(1, 2))
    with np.errstate(invalid="ignore"):
        wh = np.ptp(obs, axis=1)  # (B, 2)
        box = np.sqrt(np.abs(wh[:, 0] * wh[:, 1]))
    ok_in = finite & (box > 0)
    for i in np.flatnonzero(~finite):
        bad = int((~np.isfinite(obs[i])).any(axis=1).sum())
        reason[i] = f"non-finite landmarks ({bad} of 68 points)"
    for i in np.flatnonzero(finite & ~(box > 0)):
        reason[i] = "degenerate landmarks (bounding box has no area)"

    idx = np.flatnonzero(ok_in)
    chunks = [idx[i : i + config.chunk_size] for i in range(0, len(idx), config.chunk_size)]

    def work(ch):
        with np.errstate(all="ignore"):
            return ch, _fit_chunk(obs[ch], box[ch], system, config)

    threads = config.n_threads or _available_cpus()
    threads = max(1, min(threads, len(chunks)))
    limiter = one_blas_thread(required=False) if config.single_thread_blas and chunks else None
    if limiter is not None:
        limiter.__enter__()
    pool = None
    try:
        if threads == 1:
            results = map(work, chunks)
        else:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(max_workers=threads)
            results = pool.map(work, chunks)
        bar_on = None if (progress and len(chunks) >= 2) else False  # a terminal only
        for ch, res in progress_bar(results, total=len(chunks), desc="fit landmarks", unit="chunk", enabled=bar_on):
            coeff[ch] = res["coeff"]
            scale[ch] = res["scale"]
            rotation[ch] = res["rotation"]
            translation[ch] = res["translation"]
            residual[ch] = res["residual"]
            converged[ch] = res["converged"]
            vertices[ch] = res["vertices"]
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if limiter is not None:
            limiter.__exit__(None, None, None)

    with np.errstate(invalid="ignore", divide="ignore"):
        rn = residual / box
    finite_fit = (
        np.isfinite(coeff).all(1)
        & np.isfinite(rotation).all((1, 2))
        & np.isfinite(scale)
        & (scale > 0)
        & np.isfinite(translation).all(1)
        & np.isfinite(residual)
    )
    valid = ok_in & finite_fit & (rn <= config.max_residual)
    for i in np.flatnonzero(ok_in & ~finite_fit):
        reason[i] = "fit diverged (non-finite or zero-scale solution)"
    for i in np.flatnonzero(ok_in & finite_fit & ~(rn <= config.max_residual)):
        reason[i] = (
            f"fit diverged or landmarks inconsistent with a face: residual_normalized {rn[i]:.3g} "
            f"> max_residual {config.max_residual:g}"
        )
    bad = ok_in & ~finite_fit
    for a in (coeff, scale, rotation, translation, residual, rn):
        a[bad] = np.nan
    converged &= valid
    coeff = coeff * system.std
    ns = system.n_shape
    translation[:, 1] *= -1.0  # back to y down
    return FitResult(
        shape=coeff[:, :ns],
        expression=coeff[:, ns:],
        scale=scale,
        rotation=rotation,
        translation=translation,
        residual=residual,
        residual_normalized=rn,
        converged=converged,
        valid=valid,
        reason=reason,
        keypoint_vertices=vertices,
        n_iter=config.iterations_for(system.contour),
    )


def _available_cpus() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def _camera(x, xm, obs_t, om, oo):
    """Affine camera by the Gold Standard algorithm, decomposed to s, R, t (y-up frame).

    x: (B, K, 3) model points, xm: (B, 3) their centroid; obs_t: (B, 2, K) image points; om: (B, 2)
    their centroid; oo: (B,) their mean squared distance from it. Returns s (B,), R (B, 3, 3),
    t (B, 2) and Q = R[:2]^T R[:2] (B, 3, 3).
    """
    k = x.shape[1]
    # centred second moments (the normal equations of the affine camera, translation eliminated)
    sxx = np.matmul(x.transpose(0, 2, 1), x) - k * xm[:, :, None] * xm[:, None, :]  # (B, 3, 3)
    sox = np.matmul(obs_t, x) - k * om[:, :, None] * xm[:, None, :]  # (B, 2, 3)
    # isotropic normalisation: both point sets to RMS distance sqrt(3) resp. sqrt(2)
    nx = np.sqrt(3.0 * k / np.einsum("bii->b", sxx))
    no = np.sqrt(2.0 / oo)
    pn = np.linalg.solve(sxx * (nx * nx)[:, None, None], (sox * (nx * no)[:, None, None]).transpose(0, 2, 1))
    m = pn.transpose(0, 2, 1) * (nx / no)[:, None, None]  # denormalised 2x3 part of the camera
    # polar decomposition M = sqrt(M M^T) @ R2 (closed form for the 2x2 SPD M M^T)
    s2 = np.matmul(m, m.transpose(0, 2, 1))
    a, b, d = s2[:, 0, 0], s2[:, 0, 1], s2[:, 1, 1]
    sd = np.sqrt(np.clip(a * d - b * b, 0.0, None))
    tau = np.sqrt(a + d + 2.0 * sd)
    # sqrt(S) = (S + sd I) / tau, det sqrt(S) = sd; inverse by the 2x2 adjugate
    f = 1.0 / (sd * tau)
    inv = np.empty((len(a), 2, 2))
    inv[:, 0, 0] = (d + sd) * f
    inv[:, 0, 1] = -b * f
    inv[:, 1, 0] = -b * f
    inv[:, 1, 1] = (a + sd) * f
    r2 = np.matmul(inv, m)  # (B, 2, 3), orthonormal rows
    rot = np.empty((len(a), 3, 3))
    rot[:, :2] = r2
    rot[:, 2] = np.cross(r2[:, 0], r2[:, 1])
    # least-squares scale and translation for this rotation
    q = np.matmul(r2.transpose(0, 2, 1), r2)
    s = (r2 * sox).sum((1, 2)) / (q * sxx).sum((1, 2))
    t = om - s[:, None] * np.matmul(r2, xm[:, :, None])[..., 0]
    return s, rot, t, q


def _solve(m, rhs):
    """Batched SPD solve (B, n, n) x (B, n) with a per-face least-squares fallback when singular.

    ``m`` is modified in place when C-contiguous.
    A diagonal jitter of 1e-10 x the mean diagonal guards rank-deficient systems (zero lambdas
    and fewer identifiable directions than coefficients): there it gives the minimum-norm
    solution, as ``lstsq`` would; elsewhere it changes the solution by ~1e-10 relative.
    """
    m = np.ascontiguousarray(m)
    b, n = m.shape[0], m.shape[-1]
    diag = m.reshape(b, n * n)[:, :: n + 1]  # a view: m's diagonal is updated in place
    diag += 1e-10 * diag.mean(1, keepdims=True)
    try:
        return np.linalg.solve(m, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        out = np.empty_like(rhs)
        for i in range(m.shape[0]):
            out[i] = np.linalg.lstsq(m[i], rhs[i], rcond=None)[0]
        return out


def _keypoints(system, w, sel):
    """Model keypoints (B, 68, 3) for whitened coefficients w (B, n) and contour choice sel."""
    b = w.shape[0]
    x = (w @ system.basis_t).reshape(b, N_LANDMARKS, 3)
    x += system.mean
    if system.contour:
        rows = np.arange(len(CONTOUR_LANDMARKS))
        cb = system.cand_basis[rows[None, :], sel]  # (B, 16, 3, n)
        x[:, CONTOUR_LANDMARKS] = system.cand_mean[rows[None, :], sel] + np.einsum("bkai,bi->bka", cb, w)
    return x


def _choose_contour(system, w, rot):
    """Candidate index (B, 16) per contour landmark for the current pose and coefficients."""
    n16, k = system.cand_vertices.shape
    nc = system.n_coeff
    cand = (w @ system.cand_basis.reshape(-1, nc).T).reshape(-1, n16, k, 3) + system.cand_mean
    ex = rot[:, :2, 0]  # image-plane direction of the model's +x axis
    ex = ex / np.maximum(np.linalg.norm(ex, axis=1, keepdims=True), 1e-12)
    d3 = np.einsum("bi,bia->ba", ex, rot[:, :2, :])  # that direction in the model frame
    score = np.einsum("bjka,ba->bjk", cand, d3) * system.cand_side[None, :, None]
    away = (system.cand_side[None, :] * rot[:, 2, 0][:, None]) < 0  # outward axis points away
    return np.where(away, np.argmax(score, axis=2), 0)


def _fit_chunk(obs, box, system: KeypointSystem, config: FitConfig):
    """Fit one chunk of faces (all valid): obs (B, 68, 2) in the y-up frame."""
    b = obs.shape[0]
    nc, ns = system.n_coeff, system.n_shape
    ne = nc - ns
    obs_t = np.ascontiguousarray(obs.transpose(0, 2, 1))  # (B, 2, 68)
    om = obs.mean(1)
    oo = ((obs - om[:, None, :]) ** 2).sum((1, 2)) / N_LANDMARKS
    # sum_k o_k[r] A_k[a, :] over the fixed keypoints, once per chunk: (B, 6, n), index 3 r + a
    obs_basis = (obs_t.reshape(2 * b, N_LANDMARKS) @ system.fixed_basis.reshape(N_LANDMARKS, -1)).reshape(b, 6, nc)
    iu, ju = _Q6
    rows = np.arange(len(CONTOUR_LANDMARKS))
    w = np.tile(system.prior, (b, 1))
    sel = np.zeros((b, len(CONTOUR_LANDMARKS)), np.int64) if system.contour else None
    prev = proj = std_proj = None
    n_iter = config.iterations_for(system.contour)
    for it in range(n_iter + 1):
        x = _keypoints(system, w, sel)
        xm = x.mean(1) if system.contour else w @ system.basis_centroid + system.mean_centroid
        s, rot, t, q = _camera(x, xm, obs_t, om, oo)
        if it >= n_iter - 1:
            # the standard keypoints under the current fit (measures the change of the fit, not
            # of the contour correspondence) and the fitted landmarks (for the residual)
            xs = (w @ system.basis_t).reshape(b, N_LANDMARKS, 3) + system.mean if system.contour else x
            prev = std_proj
            std_proj = s[:, None, None] * np.matmul(xs, rot[:, :2, :].transpose(0, 2, 1)) + t[:, None, :]
            proj = std_proj
            if system.contour:
                proj = s[:, None, None] * np.matmul(x, rot[:, :2, :].transpose(0, 2, 1)) + t[:, None, :]
        if it == n_iter:
            break
        r2 = rot[:, :2, :]
        q6 = q[:, iu, ju]  # (B, 6)
        # rhs = sum_k A_k^T (R2^T (o_k - t) / s - Q X0_k) + lambda * prior
        r2t = np.matmul(r2.transpose(0, 2, 1), t[:, :, None])[..., 0]  # (B, 3)
        data = np.matmul(r2.reshape(b, 1, 6), obs_basis)[:, 0] - r2t @ system.fixed_sum
        rhs = data / s[:, None] - q6 @ system.cross + system.lam_prior
        if system.contour:
            sel = _choose_contour(system, w, rot)
            cb = system.cand_basis[rows[None, :], sel]  # (B, 16, 3, n)
            cm = system.cand_mean[rows[None, :], sel]  # (B, 16, 3)
            back = np.matmul((obs[:, CONTOUR_LANDMARKS] - t[:, None, :]) / s[:, None, None], r2)  # (B, 16, 3)
            back -= np.matmul(cm, q)
            rhs = rhs + np.einsum("bka,bkai->bi", back, cb)
            pj = np.matmul(r2[:, None], cb).reshape(b, -1, nc)  # (B, 32, n)
            jaw = np.matmul(pj.transpose(0, 2, 1), pj)  # (B, n, n)
        if system.solver == "joint":
            mat = (q6 @ system.gram).reshape(b, nc, nc)
            if system.contour:
                mat += jaw
            w = _solve(mat, rhs)
            continue
        m_ee = (q6 @ system.gram_ee).reshape(b, ne, ne)
        m_es = (q6 @ system.gram_es).reshape(b, ne, ns)
        m_ss = (q6 @ system.gram_ss).reshape(b, ns, ns)
        if system.contour:
            m_ee += jaw[:, ns:, ns:]
            m_es += jaw[:, ns:, :ns]
            m_ss += jaw[:, :ns, :ns]
        w_s = w[:, :ns]
        w_e = _solve(m_ee, rhs[:, ns:] - np.matmul(m_es, w_s[:, :, None])[..., 0])
        w_s = _solve(m_ss, rhs[:, :ns] - np.matmul(w_e[:, None, :], m_es)[:, 0])
        w = np.concatenate([w_s, w_e], axis=1)
    if config.refine:
        w, s, rot, t, proj, prev, std_proj = _refine(obs, system, w, s, rot, t, sel, config.refine)
    resid = np.sqrt(((proj - obs) ** 2).sum(-1)).mean(1)
    move = np.sqrt(((std_proj - prev) ** 2).sum(-1)).max(1) if prev is not None else np.full(b, np.inf)
    vertices = np.tile(system.keypoints, (b, 1))
    if system.contour:
        vertices[:, CONTOUR_LANDMARKS] = system.cand_vertices[rows[None, :], sel]
    return {
        "coeff": w,
        "scale": s,
        "rotation": rot,
        "translation": t,
        "residual": resid,
        "converged": move < config.tol * box,
        "vertices": vertices,
    }


def _skew(x):
    """(..., 3) -> (..., 3, 3) cross-product matrices: ``_skew(x) @ v == cross(x, v)``."""
    out = np.zeros(x.shape + (3,))
    out[..., 0, 1], out[..., 0, 2] = -x[..., 2], x[..., 1]
    out[..., 1, 0], out[..., 1, 2] = x[..., 2], -x[..., 0]
    out[..., 2, 0], out[..., 2, 1] = -x[..., 1], x[..., 0]
    return out


def _rodrigues(omega):
    """(B, 3) rotation vectors -> (B, 3, 3) rotation matrices."""
    theta = np.linalg.norm(omega, axis=1)
    k = _skew(omega)
    small = theta < 1e-8
    th = np.where(small, 1.0, theta)
    a = np.where(small, 1.0 - theta**2 / 6.0, np.sin(th) / th)
    c = np.where(small, 0.5 - theta**2 / 24.0, (1.0 - np.cos(th)) / th**2)
    return np.eye(3) + a[:, None, None] * k + c[:, None, None] * np.matmul(k, k)


def _refine(obs, system: KeypointSystem, w, s, rot, t, sel, steps):
    """Gauss-Newton steps on all parameters at once (``FitConfig.refine``).

    Minimises ``sum_k |s R[:2] X_k(w) + t - o_k|^2 + s0^2 * sum_i lambdas_i (w_i - prior_i)^2``
    (pixels^2; ``s0`` the scale at the start of the step, so that at fixed pose this is the
    objective of the coefficient steps) over a rotation increment ``R <- R expm([omega]x)``,
    ``log s``, ``t`` and ``w``: one batched 56x56 solve per step; where the full step does not
    lower a face's objective it is halved, up to 5 times, else that face keeps its parameters.
    The contour assignment stays fixed.
    """
    b = obs.shape[0]
    nc = system.n_coeff
    k = N_LANDMARKS
    rows = np.arange(len(CONTOUR_LANDMARKS))
    iu, ju = _Q6
    cb = system.cand_basis[rows[None, :], sel] if system.contour else None  # (B, 16, 3, n)
    a_fixed_t = system.fixed_basis.reshape(-1, nc).T  # (n, 204)

    def at(v):  # sum_k A_k^T v_k: (B, 68, 3[, c]) -> (B, n[, c])
        if v.ndim == 3:
            out = v.reshape(b, -1) @ system.fixed_basis.reshape(-1, nc)
            if cb is not None:
                out = out + np.einsum("bka,bkai->bi", v[:, CONTOUR_LANDMARKS], cb)
            return out
        out = np.matmul(a_fixed_t, v.reshape(b, 3 * k, -1))
        if cb is not None:
            out = out + np.einsum("bkac,bkai->bic", v[:, CONTOUR_LANDMARKS], cb)
        return out

    def objective(w_, s_, rot_, t_, s0, sel=sel, obs_=obs):
        x_ = _keypoints(system, w_, sel)
        p_ = s_[:, None, None] * np.matmul(x_, rot_[:, :2, :].transpose(0, 2, 1)) + t_[:, None, :]
        prior = (system.lambdas * (w_ - system.prior) ** 2).sum(1)
        return ((p_ - obs_) ** 2).sum((1, 2)) + s0**2 * prior, p_

    def std_projection(w_, s_, rot_, t_):
        xs = (w_ @ system.basis_t).reshape(b, k, 3) + system.mean
        return s_[:, None, None] * np.matmul(xs, rot_[:, :2, :].transpose(0, 2, 1)) + t_[:, None, :]

    f_old, proj = objective(w, s, rot, t, s)
    prev = std_proj = std_projection(w, s, rot, t)
    for _ in range(steps):
        s0 = s
        x = _keypoints(system, w, sel)
        r2 = rot[:, :2, :]
        q = np.matmul(r2.transpose(0, 2, 1), r2)
        q6 = q[:, iu, ju]
        res = proj - obs  # (B, 68, 2)
        v = np.matmul(res, r2)  # R2^T r_k, (B, 68, 3)
        z = _skew(x)  # (B, 68, 3, 3)
        y = np.matmul(q[:, None], z)  # Q [X_k]x
        qx = np.matmul(x, q)  # Q X_k
        ssq = (s * s)[:, None, None]
        n_mat = np.empty((b, nc + 6, nc + 6))
        # w-w (ridge included through the folded Gram), then w-omega, w-log s, w-t
        ww = (q6 @ system.gram).reshape(b, nc, nc)
        if cb is not None:
            pj = np.matmul(r2[:, None], cb).reshape(b, -1, nc)
            ww += np.matmul(pj.transpose(0, 2, 1), pj)
        n_mat[:, :nc, :nc] = ww * ssq
        wp = np.empty((b, nc, 6))
        wp[:, :, :3] = -ssq * at(y)
        wp[:, :, 3] = (s * s)[:, None] * at(qx)
        wt = np.matmul(system.fixed_sum.T, r2.transpose(0, 2, 1))  # sum_k A_k^T R2^T, (B, n, 2)
        if cb is not None:
            wt += np.einsum("bkai,bra->bir", cb, r2)
        wp[:, :, 4:] = s[:, None, None] * wt
        n_mat[:, :nc, nc:] = wp
        n_mat[:, nc:, :nc] = wp.transpose(0, 2, 1)
        # pose-pose: [X]x^T v = v x X, so sums over k become cross products
        xsum = x.sum(1)
        pp = np.empty((b, 6, 6))
        pp[:, :3, :3] = ssq * np.matmul(z.reshape(b, 3 * k, 3).transpose(0, 2, 1), y.reshape(b, 3 * k, 3))
        pp[:, :3, 3] = -(s * s)[:, None] * np.cross(qx, x).sum(1)
        pp[:, :3, 4] = -s[:, None] * np.cross(r2[:, 0], xsum)
        pp[:, :3, 5] = -s[:, None] * np.cross(r2[:, 1], xsum)
        pp[:, 3, 3] = s * s * (x * qx).sum((1, 2))
        pp[:, 3, 4:] = s[:, None] * np.matmul(r2, xsum[:, :, None])[..., 0]
        pp[:, 4:, 4:] = k * np.eye(2)
        pp[:, 3:, :3] = pp[:, :3, 3:].transpose(0, 2, 1)
        pp[:, 4:, 3] = pp[:, 3, 4:]
        n_mat[:, nc:, nc:] = pp
        grad = np.empty((b, nc + 6))
        grad[:, :nc] = s[:, None] * at(v) + (s * s)[:, None] * system.lambdas * (w - system.prior)
        grad[:, nc : nc + 3] = -s[:, None] * np.cross(v, x).sum(1)
        grad[:, nc + 3] = s * (v * x).sum((1, 2))
        grad[:, nc + 4 :] = res.sum(1)
        delta = -_solve(n_mat, grad)
        new = (w.copy(), s.copy(), rot.copy(), t.copy())
        idx = np.arange(b)
        step = 1.0
        for _half in range(6):
            # the full Gauss-Newton step, halved for the faces where it does not lower the objective
            d = delta[idx] * step
            w_n = w[idx] + d[:, :nc]
            rot_n = np.matmul(rot[idx], _rodrigues(d[:, nc : nc + 3]))
            s_n = s[idx] * np.exp(d[:, nc + 3])
            t_n = t[idx] + d[:, nc + 4 :]
            f_new = objective(w_n, s_n, rot_n, t_n, s0[idx], sel=None if sel is None else sel[idx], obs_=obs[idx])[0]
            ok = f_new <= f_old[idx]
            good = idx[ok]
            new[0][good], new[1][good], new[2][good], new[3][good] = w_n[ok], s_n[ok], rot_n[ok], t_n[ok]
            idx = idx[~ok]
            if idx.size == 0:
                break
            step *= 0.5
        w, s, rot, t = new
        f_old, proj = objective(w, s, rot, t, s)
        prev = std_proj
        std_proj = std_projection(w, s, rot, t)
    return w, s, rot, t, proj, prev, std_proj


# ---------------------------------------------------------------------------------------- I/O
def read_pts(path) -> np.ndarray:
    """Read a 68-point iBUG ``.pts`` file.

    The format: ``version: 1``, ``n_points: 68``, ``{``, one ``x y`` line per point, ``}``.

    Returns
    -------
    ndarray, (n_points, 2), float64
        Coordinates as written (iBUG files use 1-based pixel coordinates, x right, y down; the
        fit is translation-equivariant, so no offset is applied).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValidationError(f"cannot read: {e}", path=path) from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    n = None
    for ln in lines:
        if ln.lower().startswith("n_points"):
            try:
                n = int(ln.split(":", 1)[1])
            except (IndexError, ValueError):
                raise ValidationError(f"bad header line {ln!r}", path=path) from None
    if "{" not in lines or "}" not in lines:
        raise ValidationError("missing '{' or '}'", path=path)
    body = lines[lines.index("{") + 1 : lines.index("}")]
    try:
        pts = np.array([[float(v) for v in ln.split()] for ln in body], dtype=np.float64)
    except ValueError:
        raise ValidationError("non-numeric point line", path=path) from None
    if pts.ndim != 2 or pts.shape[1] != 2 or (n is not None and pts.shape[0] != n):
        raise ValidationError(f"expected {n if n is not None else 'n'} lines of 'x y', found {len(body)}", path=path)
    return pts
