"""Draw the figures of docs/metrics.md: the BFM mean face coloured by part region.

Usage::

    python docs/make_figures.py [--bfm DIR] [--out docs/img]

The BFM folder comes from ``--bfm`` or ``$V2M_BFM_DIR`` (see ``v2m_bench.load_bfm``). Writes
``regions_front.png`` and ``regions_profile.png``. Rendering is a plain orthographic painter's
algorithm with matplotlib (Agg, offscreen): back-facing triangles are culled, the rest are drawn
flat-shaded, far to near.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

#: Region colours (subject's left = +x; in the front view that is the right of the picture): the
#: report's, so the figures and the report agree.
from v2m_bench.report import _GREY as GREY  # noqa: E402
from v2m_bench.report import _REGION_COLOURS as COLOURS  # noqa: E402

LABELS = {
    "left_eye": "left eye",
    "right_eye": "right eye",
    "nose": "nose",
    "mouth": "mouth",
    "left_cheek": "left cheek",
    "right_cheek": "right cheek",
}


def _render(ax, v, tri, vertex_colour, view: str, keypoints=None) -> None:
    """Draw mesh ``v`` (N, 3) seen from ``view`` ('front' = from +z, 'left' = from +x)."""
    from matplotlib.collections import PolyCollection

    if view == "front":  # camera on +z looking at -z, +x to the picture's right
        screen = v[:, [0, 1]]
        depth = v[:, 2]
        towards = np.array([0.0, 0.0, 1.0])
    elif view == "left":  # camera on +x (the subject's left side) looking at -x; +z to the picture's left
        screen = np.stack([-v[:, 2], v[:, 1]], axis=1)
        depth = v[:, 0]
        towards = np.array([1.0, 0.0, 0.0])
    else:
        raise ValueError(view)
    a, b, c = v[tri[:, 0]], v[tri[:, 1]], v[tri[:, 2]]
    fn = np.cross(b - a, c - a)
    fn /= np.maximum(np.linalg.norm(fn, axis=1, keepdims=True), 1e-30)
    visible = fn @ towards > 0.0
    light = np.array([0.3, 0.4, 1.0]) if view == "front" else np.array([1.0, 0.4, 0.3])
    light /= np.linalg.norm(light)
    shade = 0.35 + 0.65 * np.clip(fn @ light, 0.0, 1.0)
    # a triangle takes the colour most of its vertices have (ties: its first vertex)
    cols = vertex_colour[tri]  # (F, 3, 3)
    same01 = np.all(cols[:, 0] == cols[:, 1], axis=1)
    same12 = np.all(cols[:, 1] == cols[:, 2], axis=1)
    face_col = np.where((same01 | ~same12)[:, None], cols[:, 0], cols[:, 1])
    order = np.argsort(depth[tri].mean(axis=1))
    order = order[visible[order]]
    polys = screen[tri[order]] / 1000.0  # millimetres
    fc = np.clip(face_col[order] * shade[order, None], 0.0, 1.0)
    ax.add_collection(PolyCollection(polys, facecolors=fc, edgecolors="none", antialiased=False))
    if keypoints is not None:
        kp = screen[keypoints] / 1000.0
        # all 68 in the front view; in the profile those on the visible half (and the midline)
        keep = np.ones(len(keypoints), bool) if view == "front" else v[keypoints, 0] > -2000.0
        ax.plot(kp[keep, 0], kp[keep, 1], "k.", ms=2.5)
    ax.set_xlim(screen[:, 0].min() / 1000 - 5, screen[:, 0].max() / 1000 + 5)
    ax.set_ylim(screen[:, 1].min() / 1000 - 5, screen[:, 1].max() / 1000 + 5)
    ax.set_aspect("equal")
    ax.set_axis_off()


def make_region_figures(model, out_dir: Path) -> list[Path]:
    """Write ``regions_front.png`` and ``regions_profile.png`` into ``out_dir``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from v2m_bench.topology import REGION_NAMES, bfm_regions

    masks = bfm_regions(model)
    v = model.mean.astype(np.float64)
    colour = np.tile(np.array(GREY), (v.shape[0], 1))
    for name in REGION_NAMES:
        colour[masks[name]] = COLOURS[name]
    out_dir.mkdir(parents=True, exist_ok=True)
    handles = [Patch(color=COLOURS[n], label=f"{LABELS[n]} ({int(masks[n].sum())})") for n in REGION_NAMES]
    paths = []
    for view, fname, title in (
        ("front", "regions_front.png", "BFM mean face, front (subject's left is on the picture's right)"),
        ("left", "regions_profile.png", "BFM mean face, seen from the subject's left"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 6.4), dpi=110)
        _render(ax, v, model.triangles, colour, view, keypoints=model.keypoints)
        ax.set_title(title, fontsize=9)
        ax.legend(handles=handles, loc="lower right", fontsize=7, frameon=False)
        p = out_dir / fname
        fig.savefig(p, bbox_inches="tight")
        plt.close(fig)
        paths.append(p)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bfm", default=None, help="BFM folder (default: $V2M_BFM_DIR)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "img"), help="output folder")
    args = ap.parse_args(argv)
    from v2m_bench import load_bfm
    from v2m_bench.errors import V2MError

    try:
        model = load_bfm(args.bfm or os.environ.get("V2M_BFM_DIR") or None, cache=False)
    except V2MError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in make_region_figures(model, Path(args.out)):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
