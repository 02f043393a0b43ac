"""Throughput of the audio front end (v2m_data.audio), in x real time per core.

    python benchmarks/bench_audio.py [--seconds 300] [--batch 32] [--repeats 5] [--json out.json]

Single-threaded (OMP/MKL/OpenBLAS/torch threads = 1, set before numpy is imported), so each
figure is per core. Stages, timed separately on the same synthetic, speech-like audio (harmonic
bursts with pauses, 3-10 s utterances, written to 16 kHz PCM_16 wavs in a temporary folder):

* decode        load_audio on 16 kHz wavs (no resampling) - and on 44.1 kHz wavs (with soxr)
* vad           vad_trim (webrtc VAD, 30 ms frames)
* log-mel+norm  log_mel + normalise, batched (``--batch`` utterances padded per call), numpy path;
                also the torch CPU path and one utterance per call for comparison
* end-to-end    extract_features(path) file by file (load -> VAD -> log-mel -> normalise)

With ``V2M_SHARED_DIR`` set, the same stages also run on the real VoxCeleb1 wavs in
``$V2M_SHARED_DIR/samples/voices``. x real time = seconds of audio / wall seconds (best of
``--repeats``; the median is shown too). The target is >= 1000x real time per core for the
batched log-mel+normalise stage. The machine description and load average are printed with the
figures, which are provisional on a shared machine.
"""

from __future__ import annotations

import os

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
for _var in _THREAD_VARS + ("VECLIB_MAXIMUM_THREADS",):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from _machine import machine  # noqa: E402  (benchmarks/_machine.py, beside this script)

TARGET_X_RT = 1000.0


def speech_like(seconds: float, rng: np.random.Generator, sr: int = 16000) -> np.ndarray:
    """Harmonic 'syllables' (random f0 90-250 Hz, vibrato) separated by short quiet gaps."""
    out, t_total = [], 0.0
    while t_total < seconds:
        d = rng.uniform(0.15, 0.6)
        t = np.arange(int(d * sr)) / sr
        f0 = rng.uniform(90, 250) * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(2, 6) * t))
        ph = 2 * np.pi * np.cumsum(f0) / sr
        s = sum(np.sin(k * ph) * rng.uniform(0.2, 1.0) / k for k in range(1, 25))
        s = s * np.sin(np.pi * t / d) ** 0.5
        gap = rng.uniform(0.02, 0.4)
        out += [0.3 * s / np.abs(s).max(), 3e-4 * rng.standard_normal(int(gap * sr))]
        t_total += d + gap
    x = np.concatenate(out)[: int(seconds * sr)]
    return (x + 1e-3 * rng.standard_normal(x.size)).astype(np.float32)


def timeit(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up (imports, allocations)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def bench_set(name: str, paths: list[Path], repeats: int, batch: int) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    from v2m_data.audio import AudioConfig, extract_features, load_audio, log_mel, mel_filterbank, normalise, vad_trim

    cfg = AudioConfig()
    fb = mel_filterbank(cfg)
    waves = [load_audio(p, cfg.sample_rate)[0] for p in paths]
    audio_s = sum(w.size for w in waves) / cfg.sample_rate
    voiced = [vad_trim(w, cfg.sample_rate) for w in waves]
    voiced_s = sum(w.size for w in voiced) / cfg.sample_rate
    rows = []

    def add(stage, fn, seconds):
        best, med = timeit(fn, repeats)
        rows.append({"set": name, "stage": stage, "audio_s": round(seconds, 2), "best_s": best, "median_s": med,
                     "x_rt_best": seconds / best, "x_rt_median": seconds / med})

    add("decode (16 kHz wav)", lambda: [load_audio(p, cfg.sample_rate) for p in paths], audio_s)
    add("vad_trim", lambda: [vad_trim(w, cfg.sample_rate) for w in waves], audio_s)

    def batched(ws, **kw):
        for i in range(0, len(ws), batch):
            normalise(*log_mel(ws[i : i + batch], filterbank=fb, config=cfg, **kw))

    add(f"log-mel+norm batched numpy (B={batch})", lambda: batched(voiced), voiced_s)
    add(f"log-mel+norm batched torch-cpu (B={batch})", lambda: batched(voiced, device="cpu"), voiced_s)
    add("log-mel+norm one-by-one numpy", lambda: [normalise(*log_mel(w, filterbank=fb, config=cfg)) for w in voiced],
        voiced_s)
    add("end-to-end extract_features", lambda: [extract_features(p, cfg) for p in paths], audio_s)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300.0, help="total synthetic audio, seconds")
    ap.add_argument("--batch", type=int, default=32, help="utterances per log_mel call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    import soundfile

    rng = np.random.default_rng(args.seed)
    import scipy
    import torch

    info = machine(scipy=scipy.__version__, torch=torch.__version__, threads=1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="v2m-bench-audio-") as tmp:
        paths16, paths44, total = [], [], 0.0
        while total < args.seconds:
            d = float(rng.uniform(3.0, 10.0))
            x = speech_like(d, rng)
            p = Path(tmp) / f"utt{len(paths16):04d}.wav"
            soundfile.write(p, x, 16000, subtype="PCM_16")
            paths16.append(p)
            total += d
        for i, p in enumerate(paths16[: max(1, len(paths16) // 4)]):  # a quarter, at 44.1 kHz
            import librosa

            x, _ = soundfile.read(p, dtype="float32")
            q = Path(tmp) / f"utt{i:04d}_44k.wav"
            soundfile.write(q, librosa.resample(x, orig_sr=16000, target_sr=44100), 44100, subtype="PCM_16")
            paths44.append(q)
        rows += bench_set("synthetic", paths16, args.repeats, args.batch)

        from v2m_data.audio import load_audio

        secs44 = sum(soundfile.info(p).duration for p in paths44)
        best, med = timeit(lambda: [load_audio(p, 16000) for p in paths44], args.repeats)
        rows.append({"set": "synthetic", "stage": "decode+resample (44.1 kHz wav)", "audio_s": round(secs44, 2),
                     "best_s": best, "median_s": med, "x_rt_best": secs44 / best, "x_rt_median": secs44 / med})

    shared = os.environ.get("V2M_SHARED_DIR")
    if shared and (Path(shared) / "samples" / "voices").is_dir():
        wavs = sorted((Path(shared) / "samples" / "voices").glob("*.wav"))
        if wavs:
            rows += bench_set(f"shared ({len(wavs)} VoxCeleb1 wavs)", wavs, args.repeats, args.batch)

    info["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
    print(f"machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, 1 thread; "
          f"load avg before {info['load_avg_1_5_15']} after {info['load_avg_after']}")
    print(f"python {info['python']}, numpy {info['numpy']}, scipy {info['scipy']}, torch {info['torch']}")
    print(f"{'set':<30} {'stage':<44} {'audio s':>8} {'x RT best':>10} {'x RT med':>9}")
    for r in rows:
        print(f"{r['set']:<30} {r['stage']:<44} {r['audio_s']:>8.1f} {r['x_rt_best']:>10.0f} {r['x_rt_median']:>9.0f}")
    key = next(r for r in rows if r["set"] == "synthetic" and r["stage"].startswith("log-mel+norm batched numpy"))
    verdict = "meets" if key["x_rt_median"] >= TARGET_X_RT else "MISSES"
    print(f"batched log-mel+normalise: {key['x_rt_median']:.0f}x real time per core (median) - {verdict} the "
          f"{TARGET_X_RT:.0f}x target")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
