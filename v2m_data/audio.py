"""Audio front end: decoding, resampling, voice-activity trimming and log-mel features.

The features follow Wen et al. 2019 ("Reconstructing faces from voices", FACTS §5), whose voice
encoder the voice->face models reuse:

* 16 kHz mono; webrtc VAD before the features;
* pre-emphasis 0.97; 400-sample (25 ms) symmetric Hamming window; hop 160 (10 ms); FFT 1024;
* 64 triangular mel filters from 20 Hz to 7200 Hz; natural log of the mel power, floored at 1e-5;
* per-utterance, per-band mean/std normalisation.

Choices made where the paper leaves room, checked against the released code of Wen et al.
(``mfcc.py``, a CMU Sphinx front end, and ``utils.py``):

* **Mel filters** come from :func:`librosa.filters.mel` with ``htk=True, norm="slaney"``. Sphinx puts
  the filter edges on the HTK mel scale (``2595 log10(1 + f/700)``) and gives each triangle the
  height ``2 / width_in_Hz`` - exactly librosa's HTK scale with Slaney (area) normalisation. The
  only difference is that Sphinx rounds the edges to FFT bins (relative L2 difference of the two
  matrices 0.16; with ``htk=False`` it is 1.25 and 63 of 64 centre bins move). After the per-band
  normalisation the per-band gain does not matter except where the log floor is reached.
* **Sample scale**: Wen's code feeds int16 sample values to the filterbank, so the 1e-5 floor acts on
  int16-scale power. ``AudioConfig.input_scale = 32768`` reproduces that with float waveforms in
  [-1, 1]; set it to 1.0 to floor float-scale power instead.
* **Frames** (default): only whole frames, ``1 + (n - 400) // 160`` of them (one zero-padded frame
  when ``0 < n < 400``); frame ``t`` covers samples ``[160 t, 160 t + 400)``.
  **Pre-emphasis** (default) runs once over the whole utterance, ``y[n] = x[n] - 0.97 x[n-1]``,
  ``x[-1] = 0``. This equals ``librosa.feature.melspectrogram(center=False)`` with the same window.
* ``AudioConfig(wen_quirks=True)`` instead reproduces two accidents of Sphinx's ``sig2logspec`` as
  Wen ran it, for features meant for an encoder trained on Wen's own files: ``int(n / 160 + 1)``
  frames whose part past the end is filled by ``numpy.resize`` (the partial frame repeated, an empty
  one all zeros), and pre-emphasis restarted in every overlapping frame from the *previous frame's
  last sample* (``y_t[0] = x_t[0] - 0.97 x_{t-1}[399]``). Measured on the six shared VoxCeleb1
  clips (whose lengths are multiples of 160, so Wen's last frame is empty): the quirks move the
  normalised features by up to ~3 units in the lowest bands (median 0.004), and Wen's
  ``int(n/160+1)`` count with zero padding instead of ``numpy.resize`` would add an all-floor last
  frame that skews every band's mean and std - which is why the default keeps whole frames only.
  The Sphinx filter rounding is a separate difference (up to ~1.7 units in the lowest bands); pass
  a Sphinx filterbank to :func:`log_mel` (``filterbank=``) where bit-level parity with Wen matters.
* **Normalisation** is ``(x - mean) / (std + eps)`` with the population std and
  ``eps = float32 machine epsilon``, as in Wen's ``get_fbank``.
* **VAD**: webrtc VAD (PyPI ``webrtcvad-wheels``, import name ``webrtcvad``), aggressiveness 2 as in
  Wen's code, 30 ms frames; non-voiced frames are dropped, frames within ``vad_hangover_ms`` of a
  voiced frame (either side) are kept so word onsets and endings are not clipped. (Wen used 20 ms
  frames and py-webrtcvad's 2-frame ring buffer, i.e. about 40 ms of hangover.)

Everything between decoding and features is a pure function on arrays. :func:`log_mel` and
:func:`normalise` are batched (leading batch axis, padded utterances with their lengths) and
vectorised; they run in numpy, or in torch when given torch tensors or a ``device``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from v2m_bench.errors import ValidationError

__all__ = [
    "AudioConfig",
    "load_audio",
    "vad_mask",
    "vad_trim",
    "mel_filterbank",
    "n_frames",
    "log_mel",
    "normalise",
    "extract_features",
    "FeatureInfo",
]

#: Sample rates the webrtc VAD accepts.
VAD_SAMPLE_RATES = (8000, 16000, 32000, 48000)


@dataclass(frozen=True)
class AudioConfig:
    """Parameters of the audio front end (defaults: Wen et al. 2019, FACTS §5).

    Attributes
    ----------
    sample_rate : int
        Rate the audio is resampled to, in Hz.
    n_mels : int
        Number of mel bands.
    n_fft : int
        FFT length in samples (frames are zero-padded to it).
    win_length : int
        Analysis window length in samples (400 = 25 ms at 16 kHz).
    hop_length : int
        Frame step in samples (160 = 10 ms at 16 kHz).
    fmin, fmax : float
        Lowest and highest edge of the mel filterbank, in Hz.
    preemphasis : float
        Pre-emphasis coefficient ``a`` of ``y[n] = x[n] - a x[n-1]``; 0 disables it.
    log_floor : float
        Mel power is clipped below at this value before the natural log.
    input_scale : float
        The waveform (float, full scale 1.0) is multiplied by this before the power spectrum.
        32768 reproduces Wen's int16-scale power (which the log floor refers to).
    window : str
        Window name for :func:`scipy.signal.get_window`; the window is symmetric
        (``numpy.hamming``), as in Wen's code.
    mel_htk : bool
        HTK mel formula (``True``, matches Sphinx/Wen) or Slaney's (``False``).
    mel_norm : str or None
        Filter normalisation passed to :func:`librosa.filters.mel`; ``"slaney"`` (area) matches the
        Sphinx ``2 / width`` triangles.
    norm_eps : float
        Added to the per-band std in :func:`normalise`.
    vad_mode : int or None
        webrtc VAD aggressiveness 0 (least) .. 3 (most); ``None`` skips the VAD.
    vad_frame_ms : int
        VAD frame length in ms (10, 20 or 30).
    vad_hangover_ms : float
        Non-voiced audio kept on each side of voiced frames, in ms (rounded up to whole frames).
    vad_on_no_speech : str
        What :func:`extract_features` does when the VAD finds no voiced frame: ``"raise"`` a
        :class:`~v2m_bench.errors.ValidationError` naming the file, or ``"keep"`` the whole file.
    wen_quirks : bool
        Reproduce the framing and per-frame pre-emphasis of Wen's Sphinx code (see the module
        docstring) instead of whole frames and one pre-emphasis pass.
    """

    sample_rate: int = 16000
    n_mels: int = 64
    n_fft: int = 1024
    win_length: int = 400
    hop_length: int = 160
    fmin: float = 20.0
    fmax: float = 7200.0
    preemphasis: float = 0.97
    log_floor: float = 1e-5
    input_scale: float = 32768.0
    window: str = "hamming"
    mel_htk: bool = True
    mel_norm: str | None = "slaney"
    norm_eps: float = float(np.finfo(np.float32).eps)
    vad_mode: int | None = 2
    vad_frame_ms: int = 30
    vad_hangover_ms: float = 60.0
    vad_on_no_speech: str = "raise"
    wen_quirks: bool = False

    def __post_init__(self) -> None:
        if self.win_length > self.n_fft:
            raise ValidationError(f"win_length {self.win_length} exceeds n_fft {self.n_fft}", key="AudioConfig")
        if self.hop_length < 1 or self.win_length < 1:
            raise ValidationError("hop_length and win_length must be positive", key="AudioConfig")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ValidationError(
                f"need 0 <= fmin < fmax <= sample_rate/2, got fmin={self.fmin}, fmax={self.fmax}", key="AudioConfig"
            )
        if self.vad_mode is not None and self.vad_mode not in (0, 1, 2, 3):
            raise ValidationError(f"vad_mode must be 0..3 or None, got {self.vad_mode!r}", key="AudioConfig")
        if self.vad_frame_ms not in (10, 20, 30):
            raise ValidationError(f"vad_frame_ms must be 10, 20 or 30, got {self.vad_frame_ms!r}", key="AudioConfig")
        if self.vad_on_no_speech not in ("raise", "keep"):
            raise ValidationError(
                f"vad_on_no_speech must be 'raise' or 'keep', got {self.vad_on_no_speech!r}", key="AudioConfig"
            )


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------


def load_audio(path: str | os.PathLike, sample_rate: int | None = 16000) -> tuple[np.ndarray, int]:
    """Decode an audio file to a mono float waveform, resampled to ``sample_rate``.

    soundfile (libsndfile: wav, flac, ogg, mp3 with recent libsndfile) is tried first; other formats
    go through :func:`librosa.load`. Channels are averaged. A differing rate is converted with
    :func:`librosa.resample` (soxr, ``"soxr_hq"``).

    Parameters
    ----------
    path : str or path-like
        The audio file.
    sample_rate : int or None
        Target rate in Hz; ``None`` keeps the file's rate.

    Returns
    -------
    wave : numpy.ndarray, float32, shape (T,)
        Samples at full scale 1.0.
    sr : int
        Sample rate of ``wave`` in Hz.

    Raises
    ------
    ValidationError
        The file is missing, cannot be decoded, holds no samples or holds non-finite samples; the
        message names the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValidationError("no such audio file", path=path)
    if os.path.getsize(path) == 0:
        raise ValidationError("audio file is empty (0 bytes)", path=path)
    try:
        import soundfile

        data, sr = soundfile.read(path, dtype="float32", always_2d=True)
        wave = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    except Exception as sf_err:  # noqa: BLE001 - libsndfile cannot read it: let librosa (audioread/ffmpeg) try
        try:
            import librosa

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # audioread deprecation / fallback notices
                wave, sr = librosa.load(path, sr=None, mono=True, dtype=np.float32)
        except Exception as lr_err:  # noqa: BLE001 - any decoder failure is the file's fault here
            raise ValidationError(
                f"cannot decode audio (soundfile: {_one_line(sf_err)}; librosa: {_one_line(lr_err)})", path=path
            ) from None
    sr = int(sr)
    if wave.size == 0:
        raise ValidationError("audio file contains no samples", path=path)
    if not np.all(np.isfinite(wave)):
        raise ValidationError("audio contains non-finite samples", path=path)
    if sample_rate is not None and sr != int(sample_rate):
        import librosa

        wave = librosa.resample(wave, orig_sr=sr, target_sr=int(sample_rate), res_type="soxr_hq")
        sr = int(sample_rate)
    return np.ascontiguousarray(wave, dtype=np.float32), sr


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:200]


# --------------------------------------------------------------------------------------------
# voice activity
# --------------------------------------------------------------------------------------------


def vad_mask(
    wave: np.ndarray, sample_rate: int = 16000, *, mode: int = 2, frame_ms: int = 30, hangover_ms: float = 60.0
) -> np.ndarray:
    """Voiced/non-voiced decision per VAD frame, dilated by the hangover.

    Parameters
    ----------
    wave : numpy.ndarray, float, shape (T,)
        Mono waveform at full scale 1.0 (values outside [-1, 1] are clipped for the VAD).
    sample_rate : int
        Rate of ``wave`` in Hz: 8000, 16000, 32000 or 48000.
    mode : int
        webrtc VAD aggressiveness, 0 (keeps most) .. 3 (drops most).
    frame_ms : int
        VAD frame length in ms: 10, 20 or 30. The last, partial frame is zero-padded for the decision.
    hangover_ms : float
        Frames within this many ms of a voiced frame (before or after) are marked voiced too.

    Returns
    -------
    numpy.ndarray, bool, shape (ceil(T / frame),)
        ``True`` for the frames to keep; frame ``i`` covers samples ``[i * frame, (i + 1) * frame)``
        with ``frame = sample_rate * frame_ms / 1000``.
    """
    try:
        import webrtcvad
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the VAD needs the webrtc VAD: pip install webrtcvad-wheels") from err

    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise ValidationError(f"vad expects a 1-D waveform, got shape {wave.shape}", key="wave")
    if int(sample_rate) not in VAD_SAMPLE_RATES:
        raise ValidationError(f"webrtc VAD needs a rate in {VAD_SAMPLE_RATES}, got {sample_rate}", key="sample_rate")
    if frame_ms not in (10, 20, 30):
        raise ValidationError(f"VAD frames must be 10, 20 or 30 ms, got {frame_ms}", key="frame_ms")
    if mode not in (0, 1, 2, 3):
        raise ValidationError(f"VAD mode must be 0..3, got {mode}", key="mode")
    step = int(sample_rate) * frame_ms // 1000
    n = -(-wave.size // step)
    if n == 0:
        return np.zeros(0, bool)
    pcm = np.zeros(n * step, np.int16)
    pcm[: wave.size] = np.round(np.clip(wave, -1.0, 32767 / 32768) * 32768.0).astype(np.int16)
    buf = pcm.tobytes()
    vad = webrtcvad.Vad(int(mode))
    nbytes = 2 * step
    voiced = np.fromiter(
        (vad.is_speech(buf[i * nbytes : (i + 1) * nbytes], int(sample_rate)) for i in range(n)), bool, count=n
    )
    k = int(np.ceil(hangover_ms / frame_ms - 1e-9)) if hangover_ms > 0 else 0
    if k > 0 and voiced.any():
        from scipy.ndimage import binary_dilation

        voiced = binary_dilation(voiced, structure=np.ones(2 * k + 1, bool))
    return voiced


def vad_trim(
    wave: np.ndarray,
    sample_rate: int = 16000,
    *,
    mode: int = 2,
    frame_ms: int = 30,
    hangover_ms: float = 60.0,
    on_no_speech: str = "keep",
    path: str | os.PathLike | None = None,
) -> np.ndarray:
    """Keep the voiced parts of a waveform (webrtc VAD), concatenated in order.

    Parameters
    ----------
    wave : numpy.ndarray, float, shape (T,)
        Mono waveform at full scale 1.0.
    sample_rate : int
        Rate in Hz: 8000, 16000, 32000 or 48000.
    mode, frame_ms, hangover_ms
        See :func:`vad_mask`.
    on_no_speech : {"keep", "raise"}
        When no frame is voiced: return ``wave`` unchanged (a caller that must record it checks
        ``vad_mask(...).any()`` or uses ``"raise"``), or raise a ``ValidationError`` naming ``path``.
    path : str or path-like, optional
        Named in the error message.

    Returns
    -------
    numpy.ndarray, same dtype as ``wave``, shape (T',), T' <= T
        The samples of the kept frames (the last frame may be partial).

    Raises
    ------
    ValidationError
        ``on_no_speech="raise"`` and no voiced frame was found; or a bad rate, mode or frame length.
    """
    if on_no_speech not in ("keep", "raise"):
        raise ValidationError(f"on_no_speech must be 'keep' or 'raise', got {on_no_speech!r}", key="on_no_speech")
    wave = np.asarray(wave)
    keep = vad_mask(wave, sample_rate, mode=mode, frame_ms=frame_ms, hangover_ms=hangover_ms)
    if not keep.any():
        if on_no_speech == "raise":
            raise ValidationError(
                f"the VAD (mode {mode}) found no voiced frame", path=None if path is None else os.fspath(path)
            )
        return wave
    step = int(sample_rate) * frame_ms // 1000
    sample_keep = np.repeat(keep, step)[: wave.size]
    return wave[sample_keep]


# --------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------


def mel_filterbank(config: AudioConfig | None = None) -> np.ndarray:
    """The triangular mel filterbank (librosa, HTK mel scale, Slaney area normalisation by default).

    Parameters
    ----------
    config : AudioConfig, optional
        Uses ``sample_rate, n_fft, n_mels, fmin, fmax, mel_htk, mel_norm``.

    Returns
    -------
    numpy.ndarray, float32, shape (n_mels, n_fft // 2 + 1)
        Filter weights over the rfft bins (bin ``k`` is at ``k * sample_rate / n_fft`` Hz).
    """
    import librosa

    c = config or AudioConfig()
    return librosa.filters.mel(
        sr=c.sample_rate,
        n_fft=c.n_fft,
        n_mels=c.n_mels,
        fmin=c.fmin,
        fmax=c.fmax,
        htk=c.mel_htk,
        norm=c.mel_norm,
        dtype=np.float32,
    )


def _window(config: AudioConfig) -> np.ndarray:
    from scipy.signal import get_window

    return get_window(config.window, config.win_length, fftbins=False).astype(np.float32)


def n_frames(n_samples: Any, config: AudioConfig | None = None) -> Any:
    """Number of feature frames of an utterance of ``n_samples`` samples.

    Default: whole frames only, ``1 + (n - win_length) // hop_length``, and 1 for
    ``0 < n < win_length``. With ``config.wen_quirks``: ``1 + n // hop_length`` (Sphinx's
    ``int(n / 160 + 1)``). 0 for no samples.

    Parameters
    ----------
    n_samples : int or array of int
        Utterance lengths in samples.
    config : AudioConfig, optional
        Uses ``hop_length``, ``win_length`` and ``wen_quirks``.

    Returns
    -------
    int or numpy.ndarray of int64
        Frame counts, same shape as ``n_samples``.
    """
    c = config or AudioConfig()
    hop, win = c.hop_length, c.win_length
    n = np.asarray(n_samples, dtype=np.int64)
    if c.wen_quirks:
        out = np.where(n > 0, 1 + n // hop, 0)
    else:
        out = np.where(n >= win, 1 + (n - win) // hop, (n > 0).astype(np.int64))
    return int(out) if out.ndim == 0 else out


def _wen_frames(x: np.ndarray, n: int, nf: int, c: AudioConfig) -> np.ndarray:
    """Wen/Sphinx raw frames of one utterance ``x[:n]`` with per-frame pre-emphasis, (nf, win) float32.

    Frame ``t`` is ``x[hop t : hop t + win]``; a frame running past the end is the available part
    repeated (``numpy.resize``; all zeros when nothing is left). Pre-emphasis restarts in each frame
    from the previous frame's last (raw) sample, 0 before the first frame.
    """
    hop, win = c.hop_length, c.win_length
    y = np.zeros((nf - 1) * hop + win, np.float32)
    y[:n] = x[:n]
    raw = np.lib.stride_tricks.sliding_window_view(y, win)[::hop][:nf].copy()
    for t in range(max(0, (n - win) // hop + 1), nf):  # the frames that run past the end (<= 3)
        left = n - t * hop
        raw[t] = x[t * hop + np.arange(win) % left] if left > 0 else 0.0
    a = np.float32(c.preemphasis)
    prev_last = np.concatenate([np.zeros(1, np.float32), raw[:-1, -1]])
    out = raw.copy()
    out[:, 1:] -= a * raw[:, :-1]
    out[:, 0] -= a * prev_last
    return out


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _batch(waves: Any, lengths: Any) -> tuple[Any, np.ndarray, bool]:
    """Stack the input into a (B, T) array/tensor plus lengths (B,) int64; flag a 1-D input."""
    if isinstance(waves, (list, tuple)):
        if len(waves) == 0:
            raise ValidationError("no waveforms given", key="waves")
        if any(_is_torch(w) for w in waves):
            import torch

            ws = [torch.as_tensor(w).reshape(-1) for w in waves]
            lens = np.array([w.shape[0] for w in ws], np.int64)
            out = torch.nn.utils.rnn.pad_sequence(ws, batch_first=True)
        else:
            ws = [np.asarray(w, dtype=np.float32).reshape(-1) for w in waves]
            lens = np.array([w.size for w in ws], np.int64)
            out = np.zeros((len(ws), int(lens.max(initial=0))), np.float32)
            for i, w in enumerate(ws):
                out[i, : w.size] = w
        if lengths is not None:
            lens = np.minimum(lens, np.asarray(lengths, np.int64).reshape(-1))
        return out, lens, False
    single = waves.ndim == 1
    if single:
        waves = waves[None]
    if waves.ndim != 2:
        raise ValidationError(f"waves must be (T,) or (B, T), got shape {tuple(waves.shape)}", key="waves")
    B, T = waves.shape
    if lengths is None:
        lens = np.full(B, T, np.int64)
    else:
        lens = np.asarray(lengths.cpu() if _is_torch(lengths) else lengths, dtype=np.int64).reshape(-1)
        if lens.shape != (B,) or (lens < 0).any() or (lens > T).any():
            raise ValidationError(f"lengths must be {B} values in [0, {T}], got {lens.tolist()}", key="lengths")
    return waves, lens, single


def log_mel(
    waves: Any,
    lengths: Any = None,
    config: AudioConfig | None = None,
    *,
    filterbank: Any = None,
    device: Any = None,
    chunk_frames: int = 256,
) -> tuple[Any, Any]:
    """Batched log-mel power spectrogram (pre-emphasis, Hamming frames, FFT, mel, log).

    Frame ``t`` of utterance ``b`` covers samples ``[t * hop, t * hop + win_length)`` of the
    pre-emphasised waveform; an utterance of ``n`` samples has :func:`n_frames` ``(n)`` frames
    (whole frames only by default; Wen's framing with ``config.wen_quirks``). Padding never leaks:
    each utterance's frames equal those of the utterance computed alone. The numpy path is the fast
    one on CPU; the torch path is meant for a GPU.

    Parameters
    ----------
    waves : array or torch.Tensor, float, shape (B, T) or (T,); or a sequence of 1-D arrays/tensors
        Waveforms at ``config.sample_rate``, full scale 1.0, padded to a common length T (a sequence
        is padded here).
    lengths : array of int, shape (B,), optional
        Valid samples per utterance (default: all T).
    config : AudioConfig, optional
        Feature parameters (default: Wen et al.).
    filterbank : array, shape (n_mels, n_fft // 2 + 1), optional
        Precomputed :func:`mel_filterbank` (saves rebuilding it on every call).
    device : str or torch.device, optional
        Compute in torch on this device. Torch tensors as input compute in torch on their device.
    chunk_frames : int
        Frames per FFT block in the numpy path (keeps the working set in cache; results do not
        depend on it).

    Returns
    -------
    feats : float32, shape (B, n_mels, F) or (n_mels, F) for a 1-D input
        Natural log of the mel power (int16-scale power with the default ``input_scale``), floored
        at ``log(log_floor)``; frames past an utterance's ``frame_lengths`` hold ``log(log_floor)``.
        ``F = max(frame_lengths)``. numpy array, or a torch tensor in the torch path.
    frame_lengths : int64, shape (B,) or () for a 1-D input
        Valid frames per utterance (numpy, or a torch tensor on the device in the torch path).
    """
    c = config or AudioConfig()
    use_torch = device is not None or _is_torch(waves) or (
        isinstance(waves, (list, tuple)) and any(_is_torch(w) for w in waves)
    )
    x, lens, single = _batch(waves, lengths)
    flens = n_frames(lens, c)
    F = int(flens.max(initial=0))
    fb = mel_filterbank(c) if filterbank is None else filterbank
    if tuple(np.shape(fb)) != (c.n_mels, c.n_fft // 2 + 1):
        raise ValidationError(
            f"filterbank must have shape ({c.n_mels}, {c.n_fft // 2 + 1}), got {tuple(np.shape(fb))}", key="filterbank"
        )
    if F == 0:  # nothing but empty utterances
        shape = (len(lens), c.win_length)
        x = x.new_zeros(shape) if _is_torch(x) else np.zeros(shape, np.float32)
    if use_torch:
        feats, fl = _log_mel_torch(x, lens, flens, F, fb, c, device)
    else:
        x, fb = np.asarray(x, dtype=np.float32), np.asarray(fb, dtype=np.float32)
        feats, fl = _log_mel_numpy(x, lens, flens, F, fb, c, chunk_frames)
    if single:
        return feats[0], fl[0]
    return feats, fl


def _log_mel_numpy(x, lens, flens, F, fb, c: AudioConfig, chunk_frames: int):
    """numpy path: frames of each utterance in blocks of ``chunk_frames`` (FFT + matmul vectorised
    over the block; a block's working set stays in cache and padded frames cost nothing)."""
    from scipy import fft as sfft

    B = x.shape[0]
    hop, win, a = c.hop_length, c.win_length, np.float32(c.preemphasis)
    w = _window(c) * np.float32(c.input_scale)
    fbT = np.ascontiguousarray(fb.T)  # (n_bins, n_mels)
    floor = np.float32(c.log_floor)
    out = np.full((B, c.n_mels, F), np.log(floor), np.float32)  # padded frames hold log(floor)
    step = max(1, min(int(chunk_frames), int(flens.max(initial=1))))
    buf = np.zeros((step, c.n_fft), np.float32)  # windowed frames, zero-padded to n_fft (tail stays 0)
    for b in range(B):
        n, nf = int(lens[b]), int(flens[b])
        if nf == 0:
            continue
        if c.wen_quirks:
            frames = _wen_frames(x[b], n, nf, c)
        else:
            # pre-emphasis over the whole utterance; zeros past its length, never the caller's padding
            m = min(n, (nf - 1) * hop + win)
            y = np.zeros((nf - 1) * hop + win, np.float32)
            y[:m] = x[b, :m]
            if a:
                y[1:m] -= a * x[b, : m - 1]
            frames = np.lib.stride_tricks.sliding_window_view(y, win)[::hop]  # (nf, win) view
        for s in range(0, nf, step):
            e = min(s + step, nf)
            blk = buf[: e - s]
            np.multiply(frames[s:e], w, out=blk[:, :win])
            spec = sfft.rfft(blk, axis=-1)  # (e - s, n_bins) complex64
            power = np.square(spec.real)
            power += np.square(spec.imag)
            mel = power @ fbT  # (e - s, n_mels)
            np.maximum(mel, floor, out=mel)
            out[b, :, s:e] = np.log(mel, out=mel).T
    return out, flens


def _log_mel_torch(x, lens, flens, F, fb, c: AudioConfig, device):
    import torch

    x = torch.as_tensor(x)
    dev = torch.device(device) if device is not None else x.device
    x = x.to(device=dev, dtype=torch.float32)
    B, T = x.shape
    hop, win = c.hop_length, c.win_length
    n_pad = max((F - 1) * hop + win, T)
    lens_t = torch.as_tensor(lens, device=dev)
    flens_t = torch.as_tensor(flens, device=dev)
    if F == 0:
        return torch.zeros((B, c.n_mels, 0), device=dev), flens_t
    y = torch.nn.functional.pad(x, (0, n_pad - T))
    beyond = torch.arange(n_pad, device=dev)[None, :] >= lens_t[:, None]
    if c.wen_quirks:
        y = y.masked_fill(beyond, 0.0)
        raw = y.unfold(-1, win, hop)[:, :F].clone()  # (B, F, win)
        # frames running past the end: the available part repeated (numpy.resize), zeros if none
        bs, ts, idx, ok = [], [], [], []
        for b in range(B):
            n, nf = int(lens[b]), int(flens[b])
            for t in range(max(0, (n - win) // hop + 1), nf):
                left = n - t * hop
                bs.append(b)
                ts.append(t)
                idx.append(t * hop + np.arange(win) % max(left, 1))
                ok.append(left > 0)
        if bs:
            bs_t, ts_t = torch.as_tensor(bs, device=dev), torch.as_tensor(ts, device=dev)
            vals = y[bs_t[:, None], torch.as_tensor(np.stack(idx), device=dev)]
            raw[bs_t, ts_t] = vals * torch.as_tensor(ok, device=dev, dtype=vals.dtype)[:, None]
        prev_last = torch.nn.functional.pad(raw[:, :-1, -1], (1, 0))  # (B, F)
        frames = raw - c.preemphasis * torch.cat([prev_last[..., None], raw[..., :-1]], dim=-1)
    else:
        if c.preemphasis:
            y = torch.cat([y[:, :1], y[:, 1:] - c.preemphasis * y[:, :-1]], dim=1)
        y = y.masked_fill(beyond, 0.0)
        frames = y.unfold(-1, win, hop)[:, :F]  # (B, F, win)
    w = torch.as_tensor(_window(c) * np.float32(c.input_scale), device=dev)
    # padding explicitly is faster than rfft(n=...) in torch's CPU FFT
    spec = torch.fft.rfft(torch.nn.functional.pad(frames * w, (0, c.n_fft - win)), dim=-1)
    power = spec.real.square() + spec.imag.square()
    fb_t = torch.as_tensor(fb, dtype=torch.float32, device=dev)
    mel = torch.matmul(power, fb_t.T).clamp_min_(c.log_floor).log_()
    pad = torch.arange(F, device=dev)[None, :, None] >= flens_t[:, None, None]  # (B, F, 1)
    mel = mel.masked_fill(pad, float(np.log(np.float32(c.log_floor))))
    return mel.transpose(1, 2).contiguous(), flens_t


def normalise(feats: Any, frame_lengths: Any = None, eps: float = float(np.finfo(np.float32).eps)) -> Any:
    """Per-utterance, per-band mean/std normalisation over the valid frames.

    ``(x - mean) / (std + eps)`` with the population std of each band over the first
    ``frame_lengths[b]`` frames; padded frames are set to 0.

    Parameters
    ----------
    feats : float array or torch.Tensor, shape (B, n_mels, F) or (n_mels, F)
        Log-mel features (e.g. from :func:`log_mel`).
    frame_lengths : int array, shape (B,) or (), optional
        Valid frames per utterance (default: all F).
    eps : float
        Added to the std (Wen: float32 machine epsilon).

    Returns
    -------
    float32 array or tensor (as ``feats``), same shape as ``feats``
        Zero mean and unit std per band on the valid frames (an utterance with no frames is all 0).
    """
    if _is_torch(feats):
        import torch

        single = feats.ndim == 2
        f = (feats[None] if single else feats).to(torch.float32)
        B, _, F = f.shape
        fl = torch.full((B,), F, device=f.device) if frame_lengths is None else torch.as_tensor(
            frame_lengths, device=f.device
        ).reshape(-1)
        m = (torch.arange(F, device=f.device)[None, :] < fl[:, None]).to(f.dtype)[:, None, :]  # (B, 1, F)
        cnt = fl.clamp_min(1).to(f.dtype)[:, None, None]
        mean = (f * m).sum(-1, keepdim=True) / cnt
        d = (f - mean) * m
        std = (d.square().sum(-1, keepdim=True) / cnt).sqrt()
        out = d / (std + eps)
        return out[0] if single else out
    f = np.asarray(feats, dtype=np.float32)
    single = f.ndim == 2
    if single:
        f = f[None]
    if f.ndim != 3:
        raise ValidationError(f"feats must be (n_mels, F) or (B, n_mels, F), got shape {f.shape}", key="feats")
    B, _, F = f.shape
    fl = np.full(B, F, np.int64) if frame_lengths is None else np.asarray(frame_lengths, np.int64).reshape(-1)
    if fl.shape != (B,) or (fl < 0).any() or (fl > F).any():
        raise ValidationError(f"frame_lengths must be {B} values in [0, {F}]", key="frame_lengths")
    m = (np.arange(F)[None, :] < fl[:, None])[:, None, :]  # (B, 1, F)
    cnt = np.maximum(fl, 1).astype(np.float64)[:, None, None]
    d = np.where(m, f, np.float32(0))  # padded frames (whatever they hold) weigh 0
    mean = (d.sum(-1, keepdims=True, dtype=np.float64) / cnt).astype(np.float32)
    d -= mean
    d *= m
    std = np.sqrt(np.square(d).sum(-1, keepdims=True, dtype=np.float64) / cnt).astype(np.float32)
    out = d
    out *= 1.0 / (std + np.float32(eps))
    return out[0] if single else out


class FeatureInfo(NamedTuple):
    """What :func:`extract_features` also reports with ``return_info=True``.

    Attributes
    ----------
    sample_rate : int
        Rate of the decoded waveform in Hz (``config.sample_rate``, or the file's own when None).
    samples : int
        Samples of the decoded waveform (``samples / sample_rate``: the duration in seconds).
    voiced_samples : int
        Samples left after the VAD (all of them with ``vad_mode=None``).
    """

    sample_rate: int
    samples: int
    voiced_samples: int


def extract_features(
    path: str | os.PathLike,
    config: AudioConfig | None = None,
    *,
    filterbank: Any = None,
    return_info: bool = False,
) -> np.ndarray | tuple[np.ndarray, FeatureInfo]:
    """Load -> VAD -> log-mel -> normalise one file (Wen et al. features).

    The dataset build computes every utterance's features with this function.

    Parameters
    ----------
    path : str or path-like
        Audio file (any format :func:`load_audio` decodes).
    config : AudioConfig, optional
        Front-end parameters; ``vad_mode=None`` skips the VAD.
    filterbank : array, shape (n_mels, n_fft // 2 + 1), optional
        Precomputed :func:`mel_filterbank` ``(config)`` (saves rebuilding it for every file; the
        features do not depend on it being given).
    return_info : bool, default False
        Also return the sample counts (:class:`FeatureInfo`).

    Returns
    -------
    numpy.ndarray, float32, shape (n_mels, F)
        Normalised log-mel features, ``F = n_frames(len(voiced audio))`` (100 frames per second).
    FeatureInfo
        Only with ``return_info=True``: ``(features, info)``.

    Raises
    ------
    ValidationError
        Undecodable/empty file, or (``vad_on_no_speech="raise"``) no voiced frame; names the file.
    """
    c = config or AudioConfig()
    wave, sr = load_audio(path, c.sample_rate)
    samples = wave.shape[0]
    if c.vad_mode is not None:
        wave = vad_trim(
            wave,
            sr,
            mode=c.vad_mode,
            frame_ms=c.vad_frame_ms,
            hangover_ms=c.vad_hangover_ms,
            on_no_speech=c.vad_on_no_speech,
            path=path,
        )
    feats, fl = log_mel(wave, None, c, filterbank=filterbank)
    feats = normalise(feats, fl, c.norm_eps)
    if return_info:
        return feats, FeatureInfo(int(sr), int(samples), int(wave.shape[0]))
    return feats
