"""v2m_bench imports and scores with numpy, scipy and h5py alone (the brief's layering rule)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

BLOCKED = ("torch", "numba", "pandas", "matplotlib", "tqdm", "librosa", "cv2", "click", "v2m_data", "v2m_models")

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, pkgutil, sys

    BLOCKED = {blocked!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked for this test: {{name}}")
            return None

    sys.meta_path.insert(0, Block())
    import numpy as np
    import v2m_bench
    # every public module of the package imports
    importlib = __import__("importlib")
    for m in pkgutil.iter_modules(v2m_bench.__path__):
        if not m.name.startswith("_"):
            importlib.import_module(f"v2m_bench.{{m.name}}")
    from v2m_bench import metrics
    from v2m_bench.metrics import icp_rmse
    # every module of the metrics package but the numba kernels imports too
    for m in pkgutil.walk_packages(metrics.__path__, "v2m_bench.metrics."):
        if m.name.rsplit(".", 1)[1] not in ("kernels", "grid_kernels", "score_kernels", "_v2v_kernels"):
            importlib.import_module(m.name)
    import v2m_bench.icp
    assert v2m_bench.icp.icp_scores is metrics.icp_scores

    rng = np.random.default_rng(0)
    n = 12
    u = np.linspace(-1, 1, n)
    gx, gy = np.meshgrid(u, u)
    v = np.stack([gx * 50_000, gy * 50_000, 20_000 * np.cos(gx) * np.cos(gy)], -1).reshape(-1, 3)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    tri = np.concatenate([np.stack([a, b, d], -1).reshape(-1, 3), np.stack([a, d, c], -1).reshape(-1, 3)])
    pred = v + rng.normal(scale=300.0, size=v.shape)
    r = icp_rmse(pred[None], v[None], tri)  # engine auto: numba is blocked, so the k-d trees
    assert r.rmse.shape == (1,) and 0.05 < r.rmse[0] < 0.5, r.rmse
    loaded = sorted(k.split(".")[0] for k in sys.modules if k.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("ok")
    """
).format(blocked=BLOCKED)


def test_v2m_bench_needs_only_numpy_scipy_h5py():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_the_data_and_model_packages_name_their_entry_points():
    """``v2m_data`` and ``v2m_models`` expose a small public surface (v2m_data's loaded on first use)."""
    import subprocess
    import sys

    code = (
        "import sys, v2m_data\n"
        "assert 'v2m_data.building' not in sys.modules  # loaded on first use\n"
        "import v2m_models\n"
        "from v2m_data import build, open_dataset, make_world\n"
        "from v2m_data.building import build as b\n"
        "assert build is b\n"
        "from v2m_models import train_supervised, predict\n"
        "import v2m_models.supervised as s\n"
        "assert train_supervised is s.train_supervised\n"
        "for pkg in (v2m_data, v2m_models):\n"
        "    assert pkg.__doc__ and all(hasattr(pkg, n) for n in pkg.__all__)\n"
        "try:\n"
        "    v2m_data.nope\n"
        "except AttributeError as e:\n"
        "    assert 'nope' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_private_metric_modules_are_used_only_inside_the_metrics_package():
    """``v2m_bench.metrics._icp`` and ``_checks`` are one unit with the metric modules: no other
    package module imports them (tests may)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    pattern = re.compile(r"metrics\._|from \.+_icp|from \.+_checks|_nnkernel|from [\w.]*(metrics|icp)[\w.]* import \(?_")
    inside = root / "v2m_bench" / "metrics"
    offenders = []
    for folder in ("v2m_bench", "v2m_data", "v2m_models", "cli", "benchmarks"):
        for path in (root / folder).rglob("*.py"):
            if inside in path.parents:
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(root)}:{i}: {line.strip()}")
    assert not offenders, offenders


def test_every_package_folder_is_installed():
    """A package folder missing from pyproject's explicit list would be left out of a wheel."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    conf = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    dirs = {name: root / folder for name, folder in conf.get("package-dir", {}).items()}
    found = set()
    for top in ("v2m_bench", "v2m_data", "v2m_models", "v2m_cli"):
        base = dirs.get(top, root / top)
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join((top, *rel.parts)))
    assert found - listed == set(), f"package folders missing from pyproject's packages: {sorted(found - listed)}"
    assert listed - found == set(), f"listed packages with no folder: {sorted(listed - found)}"
