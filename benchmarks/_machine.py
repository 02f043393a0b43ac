"""What the benchmark scripts record about the machine they ran on (imported by the scripts)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np


def machine(**extra) -> dict:
    """CPU model, CPU counts, load average, Python/numpy versions and platform, plus ``extra``."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count()
    out = {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "cpus_available": available,
        "load_avg_1_5_15": load,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
    }
    out.update(extra)
    return out
