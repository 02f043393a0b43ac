"""Tests of v2m_data.audio: decoding, resampling, VAD and the Wen et al. log-mel features."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

soundfile = pytest.importorskip("soundfile")
librosa = pytest.importorskip("librosa")

from v2m_bench.errors import ValidationError  # noqa: E402
from v2m_data.audio import (  # noqa: E402
    AudioConfig,
    extract_features,
    load_audio,
    log_mel,
    mel_filterbank,
    n_frames,
    normalise,
    vad_mask,
    vad_trim,
)

SR = 16000
CFG = AudioConfig()


# ------------------------------------------------------------------------------------------------
# synthetic material
# ------------------------------------------------------------------------------------------------


def tone(freq: float, seconds: float, sr: int = SR, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def voiced_burst(seconds: float, f0: float = 140.0, sr: int = SR) -> np.ndarray:
    """Speech-like: a vibrato harmonic series (1/k amplitudes) under a smooth envelope."""
    t = np.arange(int(round(seconds * sr))) / sr
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.1 * np.sin(2 * np.pi * 3 * t))) / sr
    s = sum(np.sin(k * phase) / k for k in range(1, 20))
    env = np.sin(np.pi * t / seconds) ** 0.5
    return (0.3 * s * env / np.abs(s).max()).astype(np.float32)


def quiet(seconds: float, rng: np.random.Generator, sr: int = SR) -> np.ndarray:
    return (1e-4 * rng.standard_normal(int(round(seconds * sr)))).astype(np.float32)


def reference_features(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Straightforward librosa computation of Wen's features (values written out), for parity.

    librosa centres the 400-sample window inside the 1024-sample frame, so 312 leading zeros put
    its frame ``t`` on samples ``[160 t, 160 t + 400)``, like ours. Returns (log-mel, normalised),
    each (64, 1 + len(x) // 160).
    """
    x = x.astype(np.float64)
    y = librosa.effects.preemphasis(x, coef=0.97, zi=0.0) * 32768.0  # int16 scale, as Wen
    y = np.concatenate([np.zeros(312), y, np.zeros(1024)])
    mel = librosa.feature.melspectrogram(
        y=y, sr=16000, n_fft=1024, hop_length=160, win_length=400, window=np.hamming(400),
        center=False, power=2.0, n_mels=64, fmin=20.0, fmax=7200.0, htk=True, norm="slaney",
    )
    n = 1 + (len(x) - 400) // 160  # whole frames
    logmel = np.log(np.maximum(mel[:, :n], 1e-5))
    normed = (logmel - logmel.mean(1, keepdims=True)) / (logmel.std(1, keepdims=True) + np.finfo(np.float32).eps)
    return logmel, normed


def test_defaults_are_wen_parameters():
    c = AudioConfig()
    assert (c.sample_rate, c.n_mels, c.n_fft, c.win_length, c.hop_length) == (16000, 64, 1024, 400, 160)
    assert (c.fmin, c.fmax, c.preemphasis, c.log_floor) == (20.0, 7200.0, 0.97, 1e-5)
    assert (c.window, c.mel_htk, c.mel_norm, c.input_scale) == ("hamming", True, "slaney", 32768.0)
    assert (c.vad_mode, c.vad_frame_ms) == (2, 30)


# ------------------------------------------------------------------------------------------------
# features
# ------------------------------------------------------------------------------------------------


def htk_band_centres(cfg: AudioConfig = CFG) -> np.ndarray:
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    imel = lambda m: 700.0 * (10 ** (m / 2595.0) - 1.0)  # noqa: E731
    return imel(np.linspace(mel(cfg.fmin), mel(cfg.fmax), cfg.n_mels + 2))[1:-1]


@pytest.mark.parametrize("freq", [150.0, 440.0, 1000.0, 2500.0, 6000.0])
def test_pure_tone_lands_in_its_mel_band(freq):
    feats, _ = log_mel(tone(freq, 1.0))
    energy = feats[:, 5:-5].mean(axis=1)  # (n_mels,), away from the edges
    expected = int(np.argmin(np.abs(htk_band_centres() - freq)))
    assert abs(int(np.argmax(energy)) - expected) <= 1
    # it dominates: bands far from the tone are at least 1e4 weaker in power
    far = np.abs(np.arange(CFG.n_mels) - expected) > 6
    assert energy.max() - energy[far].max() > np.log(1e4)


@pytest.mark.parametrize("n", [1, 159, 160, 161, 399, 400, 401, 559, 560, 16000, 16001, 16159])
def test_frame_count_formulas(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    whole = 1 + (n - 400) // 160 if n >= 400 else 1  # whole frames only (one padded frame if short)
    feats, fl = log_mel(x)
    assert feats.shape == (CFG.n_mels, whole) and int(fl) == whole == n_frames(n)
    wen = AudioConfig(wen_quirks=True)
    feats, fl = log_mel(x, config=wen)
    assert feats.shape == (CFG.n_mels, 1 + n // 160) and int(fl) == 1 + n // 160 == n_frames(n, wen)
    assert n_frames(0) == 0 == n_frames(0, wen)
    np.testing.assert_array_equal(n_frames(np.array([0, 399, 400, 560])), [0, 1, 1, 2])


def test_frames_cover_hop_aligned_windows():
    """An impulse at sample 1000 (and its pre-emphasis echo at 1001) shows in frames 4, 5, 6 only."""
    x = np.zeros(3000, np.float32)
    x[1000] = 0.5
    feats, _ = log_mel(x)
    touched = np.flatnonzero((feats > np.log(CFG.log_floor) + 1e-3).any(axis=0))
    # frame t covers [160 t, 160 t + 400): 160 t <= 1001 and 160 t + 400 > 1000  ->  t in {4, 5, 6}
    np.testing.assert_array_equal(touched, [4, 5, 6])
    assert np.all(feats[:, :4] == np.float32(np.log(np.float32(CFG.log_floor))))


def test_normalise_real_frames_only():
    rng = np.random.default_rng(1)
    waves = [rng.standard_normal(n).astype(np.float32) * s for n, s in [(16000, 0.1), (7000, 0.5), (25000, 0.01)]]
    feats, fl = log_mel(waves)
    feats[0, :, fl[0]:] = 1e6  # garbage in the padding must not matter
    feats[1, :, fl[1]:] = -1e6
    out = normalise(feats, fl)
    assert out.dtype == np.float32 and out.shape == feats.shape
    for b in range(3):
        valid = out[b, :, : fl[b]]
        np.testing.assert_allclose(valid.mean(axis=1), 0.0, atol=1e-5)
        np.testing.assert_allclose(valid.std(axis=1), 1.0, atol=1e-4)
        assert np.all(out[b, :, fl[b]:] == 0)
    # one utterance alone gives the same numbers
    np.testing.assert_allclose(out[1, :, : fl[1]], normalise(feats[1, :, : fl[1]]), atol=1e-6)


def test_batched_equals_one_by_one():
    rng = np.random.default_rng(2)
    lens = [16000, 4321, 30000, 161]
    waves = [(voiced_burst(n / SR) + 0.01 * rng.standard_normal(n)).astype(np.float32) for n in lens]
    # a padded (B, T) array with garbage past each length
    T = max(lens) + 500
    padded = rng.standard_normal((len(lens), T)).astype(np.float32)
    for i, w in enumerate(waves):
        padded[i, : len(w)] = w
    fb = mel_filterbank()
    batched, fl = log_mel(padded, lens, filterbank=fb)
    listed, fl2 = log_mel(waves)
    np.testing.assert_array_equal(fl, [n_frames(n) for n in lens])
    np.testing.assert_array_equal(fl, fl2)
    assert batched.shape == (len(lens), CFG.n_mels, max(fl))
    for i, w in enumerate(waves):
        alone, n = log_mel(w)
        assert int(n) == fl[i]
        np.testing.assert_allclose(batched[i, :, : fl[i]], alone, atol=1e-4)
        np.testing.assert_allclose(listed[i, :, : fl[i]], alone, atol=1e-4)
        assert np.all(batched[i, :, fl[i]:] == np.float32(np.log(np.float32(CFG.log_floor))))
    # the chunking of the FFT does not change results
    np.testing.assert_allclose(log_mel(waves, chunk_frames=7)[0], listed, atol=1e-4)


def test_torch_path_matches_numpy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    waves = [(voiced_burst(n / SR) + 0.01 * rng.standard_normal(n)).astype(np.float32) for n in (8000, 12345)]
    ref, fl = log_mel(waves)
    got, fl_t = log_mel([torch.from_numpy(w) for w in waves])
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_array_equal(fl_t.numpy(), fl)
    np.testing.assert_allclose(got.numpy(), ref, atol=5e-4)
    np.testing.assert_allclose(normalise(got, fl_t).numpy(), normalise(ref, fl), atol=5e-4)
    dev, _ = log_mel(waves[0], device="cpu")
    np.testing.assert_allclose(dev.numpy(), ref[0, :, : fl[0]], atol=5e-4)
    # garbage past the lengths (one utterance shorter than a window) does not leak in torch either
    padded = torch.from_numpy(rng.standard_normal((2, 9000)).astype(np.float32))
    padded[0, :8000] = torch.from_numpy(waves[0][:8000])
    padded[1, :300] = torch.from_numpy(waves[1][:300])
    got, fl_t = log_mel(padded, torch.tensor([8000, 300]))
    for i, n in enumerate([8000, 300]):
        alone, _ = log_mel(waves[i][:n])
        np.testing.assert_allclose(got[i, :, : fl_t[i]].numpy(), alone, atol=5e-4)


def test_parity_with_librosa_melspectrogram():
    rng = np.random.default_rng(4)
    x = np.concatenate([voiced_burst(0.7), quiet(0.2, rng), voiced_burst(0.5, f0=210.0)])
    x = (x + 0.003 * rng.standard_normal(x.size)).astype(np.float32)
    ref_log, ref_norm = reference_features(x)
    feats, fl = log_mel(x)
    assert feats.shape == ref_log.shape
    # float32 FFT vs librosa's float64 STFT: observed max |diff| ~1e-4 (log units)
    np.testing.assert_allclose(feats, ref_log, atol=5e-4)
    np.testing.assert_allclose(normalise(feats, fl), ref_norm, atol=5e-4)


def sphinx_logspec_loop(x: np.ndarray, fb: np.ndarray) -> np.ndarray:
    """Wen's Sphinx ``sig2logspec`` written out frame by frame (its framing and pre-emphasis as
    they run, on int16-scale samples), with a given filterbank: (64, int(n / 160 + 1))."""
    sig = x.astype(np.float64) * 32768.0
    n_fr = int(len(sig) / 160 + 1)
    out = np.zeros((64, n_fr))
    prior, win = 0.0, np.hamming(400)
    for t in range(n_fr):
        frame = sig[160 * t : min(len(sig), 160 * t + 400)]
        if len(frame) < 400:
            frame = np.resize(frame, 400)  # repeats the partial frame (zeros if empty)
        shifted = np.concatenate([[prior], frame[:-1]])
        prior = frame[-1]
        spec = np.fft.rfft((frame - 0.97 * shifted) * win, 1024)
        out[:, t] = np.log(np.clip(fb.astype(np.float64) @ (spec.real**2 + spec.imag**2), 1e-5, None))
    return out


def test_wen_quirks_reproduce_sphinx_framing():
    rng = np.random.default_rng(6)
    cfg = AudioConfig(wen_quirks=True)
    fb = mel_filterbank(cfg)
    lens = [16000, 16077, 16250, 350, 160]  # a multiple of 160 leaves Wen an empty last frame
    waves = [(voiced_burst(n / SR) + 0.01 * rng.standard_normal(n)).astype(np.float32) for n in lens]
    batched, fl = log_mel(waves, config=cfg)
    for i, w in enumerate(waves):
        ref = sphinx_logspec_loop(w, fb)
        assert fl[i] == ref.shape[1]
        np.testing.assert_allclose(batched[i, :, : fl[i]], ref, atol=5e-4)
    torch = pytest.importorskip("torch")
    got, fl_t = log_mel([torch.from_numpy(w) for w in waves], config=cfg)
    np.testing.assert_array_equal(fl_t.numpy(), fl)
    np.testing.assert_allclose(got.numpy(), batched, atol=5e-4)
    # and it is really different from the default framing in the first frames' low bands
    clean, _ = log_mel(waves[0])
    assert np.abs(clean - batched[0, :, : clean.shape[1]]).max() > 0.1


def test_filterbank_is_librosa_htk_slaney():
    fb = mel_filterbank()
    assert fb.shape == (64, 513) and fb.dtype == np.float32
    ref = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=64, fmin=20, fmax=7200, htk=True, norm="slaney")
    np.testing.assert_allclose(fb, ref, rtol=1e-6)
    # nothing below 20 Hz or above 7200 Hz
    freqs = np.arange(513) * 16000 / 1024
    assert np.all(fb[:, (freqs < 20) | (freqs > 7200)] == 0)


def test_log_floor_and_input_scale():
    silent, _ = log_mel(np.zeros(1600, np.float32))
    assert np.all(silent == np.float32(np.log(np.float32(1e-5))))
    x = tone(1000.0, 0.5, amp=1e-3)
    a, _ = log_mel(x)
    b, _ = log_mel(x, config=dataclasses.replace(CFG, input_scale=1.0))
    band = int(np.argmin(np.abs(htk_band_centres() - 1000.0)))
    # above the floor the scale is a constant 2 log(32768) offset
    np.testing.assert_allclose(a[band, 5:-5] - b[band, 5:-5], 2 * np.log(32768.0), atol=1e-3)


# ------------------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [44100, 8000, 22050])
def test_resampling_to_16k(tmp_path, rate):
    path = tmp_path / f"tone_{rate}.wav"
    soundfile.write(path, tone(440.0, 1.0, sr=rate), rate, subtype="PCM_16")
    wave, sr = load_audio(path)
    assert sr == 16000 and wave.dtype == np.float32 and wave.ndim == 1
    assert abs(wave.size - 16000) <= 1
    spec = np.abs(np.fft.rfft(wave * np.hanning(wave.size)))
    assert abs(np.argmax(spec) * 16000 / wave.size - 440.0) <= 2.0
    assert 0.45 < np.abs(wave[100:-100]).max() < 0.55
    native, sr_native = load_audio(path, sample_rate=None)
    assert sr_native == rate and native.size == rate


def test_stereo_is_mixed_down(tmp_path):
    path = tmp_path / "stereo.wav"
    left, right = tone(300.0, 0.5), tone(500.0, 0.5, amp=0.25)
    soundfile.write(path, np.stack([left, right], 1), SR, subtype="FLOAT")
    wave, _ = load_audio(path)
    np.testing.assert_allclose(wave, (left + right) / 2, atol=1e-6)


def test_librosa_fallback_when_soundfile_fails(tmp_path, monkeypatch):
    path = tmp_path / "x.wav"
    soundfile.write(path, tone(440.0, 0.25), SR, subtype="PCM_16")

    def broken(*a, **k):
        raise RuntimeError("pretend libsndfile cannot read this format")

    monkeypatch.setattr(soundfile, "read", broken)
    wave, sr = load_audio(path)
    assert sr == SR and wave.size == 4000


def test_bad_files_raise_validation_error_naming_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    zero = tmp_path / "zero_length.wav"
    soundfile.write(zero, np.zeros(0, np.float32), SR, subtype="PCM_16")
    missing = tmp_path / "missing.wav"
    for p in (corrupt, empty, zero, missing):
        with pytest.raises(ValidationError, match=p.name) as info:
            load_audio(p)
        assert "\n" not in str(info.value)
        with pytest.raises(ValidationError, match=p.name):
            extract_features(p)


# ------------------------------------------------------------------------------------------------
# VAD
# ------------------------------------------------------------------------------------------------


def test_vad_removes_long_silence_keeps_bursts():
    rng = np.random.default_rng(5)
    a, b = voiced_burst(1.0), voiced_burst(0.8, f0=200.0)
    pieces = [quiet(0.3, rng), a, quiet(2.0, rng), b, quiet(0.3, rng)]
    x = np.concatenate(pieces)
    out = vad_trim(x, SR)
    speech = a.size + b.size
    assert speech <= out.size <= speech + int(0.6 * SR)  # 2.6 s of silence, at most 0.6 s left
    # the bursts survive whole: every burst sample lies in a kept frame
    keep = np.repeat(vad_mask(x, SR), 480)[: x.size]
    start_a, start_b = pieces[0].size, pieces[0].size + a.size + pieces[2].size
    assert keep[start_a : start_a + a.size].all() and keep[start_b : start_b + b.size].all()
    np.testing.assert_allclose(np.sum(out.astype(np.float64) ** 2), np.sum(a**2.0) + np.sum(b**2.0), rtol=1e-3)
    # the hangover keeps some frames around the voiced ones
    assert vad_mask(x, SR, hangover_ms=60).sum() > vad_mask(x, SR, hangover_ms=0).sum()


def test_vad_without_speech():
    x = np.zeros(SR, np.float32)
    np.testing.assert_array_equal(vad_trim(x, SR), x)  # default: keep, the caller decides
    assert not vad_mask(x, SR).any()
    with pytest.raises(ValidationError, match="silence.wav"):
        vad_trim(x, SR, on_no_speech="raise", path="some/dir/silence.wav")
    with pytest.raises(ValidationError, match="sample_rate"):
        vad_trim(x, 22050)


def test_extract_features_on_silent_file(tmp_path):
    path = tmp_path / "silence.wav"
    soundfile.write(path, np.zeros(SR, np.float32), SR, subtype="PCM_16")
    with pytest.raises(ValidationError, match="silence.wav.*no voiced"):
        extract_features(path)
    feats = extract_features(path, dataclasses.replace(CFG, vad_on_no_speech="keep"))
    assert feats.shape == (64, 1 + (16000 - 400) // 160) and np.all(feats == 0)


def test_config_validation():
    with pytest.raises(ValidationError, match="vad_mode"):
        AudioConfig(vad_mode=5)
    with pytest.raises(ValidationError, match="fmax"):
        AudioConfig(fmax=9000.0)
    with pytest.raises(ValidationError, match="n_fft"):
        AudioConfig(win_length=2048)


# ------------------------------------------------------------------------------------------------
# the real VoxCeleb1 samples in ../shared
# ------------------------------------------------------------------------------------------------


def _shared_wavs(shared_dir):
    wavs = sorted((shared_dir / "samples" / "voices").glob("*.wav"))
    if not wavs:
        pytest.skip(f"no wavs under {shared_dir / 'samples' / 'voices'}")
    return wavs


@pytest.mark.shared
def test_real_voices(shared_dir):
    wavs = _shared_wavs(shared_dir)
    assert len(wavs) == 6
    for path in wavs:
        wave, sr = load_audio(path)
        info = soundfile.info(path)
        assert sr == 16000 and wave.size == info.frames
        hundredths = info.frames / 160  # duration * 100 frames per second
        raw = extract_features(path, dataclasses.replace(CFG, vad_mode=None))
        assert raw.shape == (64, 1 + (wave.size - 400) // 160)
        assert -3 < raw.shape[1] - hundredths <= 0
        feats = extract_features(path)
        assert feats.dtype == np.float32 and np.isfinite(feats).all()
        assert feats.shape[0] == 64 and 0.5 * hundredths <= feats.shape[1] <= hundredths
        np.testing.assert_allclose(feats.mean(1), 0, atol=1e-4)
        np.testing.assert_allclose(feats.std(1), 1, atol=1e-3)


@pytest.mark.shared
def test_real_voices_parity_with_librosa(shared_dir):
    wavs = _shared_wavs(shared_dir)
    waves = [load_audio(p)[0] for p in wavs[:3]]
    feats, fl = log_mel(waves)
    normed = normalise(feats, fl)
    for i, w in enumerate(waves):
        ref_log, ref_norm = reference_features(w)
        np.testing.assert_allclose(feats[i, :, : fl[i]], ref_log, atol=5e-4)
        np.testing.assert_allclose(normed[i, :, : fl[i]], ref_norm, atol=5e-4)
