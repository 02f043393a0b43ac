"""A synthetic world in the real dataset formats: made-up people with BFM faces and linked voices.

:func:`make_world` writes, under ``out``::

    vox1_meta.csv                                  VoxCeleb1 metadata (tab-separated)
    wav/<VoxCeleb1 ID>/<video id>/<nnnnn>.wav      16 kHz mono 16-bit speech
    vggface/files/<Name>.txt                       VGGFace (v1) annotation lines
    vggface/images/<Name>/<id>.jpg                 face photos (rendered BFM meshes)
    vggface/images/<Name>/<id>.pts                 their 68 iBUG landmarks (1-based on disk)
    truth.h5                                       everything the generator decided (below)

Identities
----------
Names are made-up ``Given_Surname`` strings whose first letters are spread over A-E (a
``test_fraction`` of them, at least one when there are two or more identities) and F-Z, so both
sides of the A-E split (:func:`v2m_bench.split.split_of`) are populated. VoxCeleb1 ids
``id10001, id10002, ...`` follow the sorted names, as in the real release. Genders are balanced
(``female_fraction``), randomly assigned. ``Set`` is ``test`` for names starting with E (the real
VoxCeleb1 verification test set is the E names id10270-id10309), else ``dev``.

Faces
-----
Per identity: shape coefficients ``shape = shape_std * z`` with ``z ~ N(gender_shift * d, I)``
clipped to ``|z| <= shape_clip``, where ``d`` is the unit direction of whitened coefficient space
along which the face width grows fastest and ``gender_shift = +gender_width_shift`` for men and
``-gender_width_shift`` for women (men's faces are wider on average); a skin colour, hair/brow, iris
and lip colours and a hairline. Per image: ``expression = expression_mean + expression_scale *
expression_std * N(0, I)``; a head pose (yaw, pitch, roll ~ N(0, std) clipped; see
:func:`v2m_bench.render.view_rotation` for the signs); a scale putting the keypoints' width at a
``face_fraction`` of the image and a small random shift; a distant light (direction, ambient,
diffuse, tint); a background (a solid colour or a linear gradient, plus pixel noise). The mesh is
rendered with :func:`v2m_bench.render.render_mesh` at ``supersample`` times the size, averaged down
(anti-aliased edges), composited on the background, given sensor noise and saved as a JPEG of
fixed quality. Landmarks are the 68 keypoint vertices projected with the image's camera
(AFLW2000-3D style 3-D landmarks: the jaw points are not moved to the silhouette). The face box is
a detector-like square around them: side ``1.3 x`` the longer side of the landmarks' bounding box,
centred ``0.1 x`` its height above the box's centre, clipped to the image. Annotation lines
(``files/<Name>.txt``): id ``00000001, ...``; url ``http://example.invalid/vggface/<Name>/<id>.jpg``;
the box; pose ``3`` when ``|yaw| <= 20`` degrees (frontal: > 2), else ``1`` (yaw < 0) or ``2``;
detection_score ``2.5 + 1.5 (1 - |yaw| / 45) + N(0, 0.2^2)``; curation ``1``.

Camera of an image (as ``v2m_data.fitting.project``): ``u = s (R X)_x + t_x``,
``v = t_y - s (R X)_y``, pixel centres at integer coordinates (0-based); ``X`` in BFM units.

Voices
------
Source-filter speech: a glottal pulse train at the utterance's f0 contour (phrase declination and a
slow wobble around the utterance's f0, 1 % period jitter, 4 % shimmer, spectral tilt) through a
cascade of four formant resonators following a vowel sequence (Peterson-Barney male formants
multiplied by the identity's formant scale), syllables at the identity's speaking rate with
onset consonants (band-limited noise), phrases of 3-8 syllables separated by pauses, silence at
both ends (so a VAD has something to trim) and background noise at a random SNR.

The voice link (:class:`VoiceLink`) makes an identity's mean pitch (f0, Hz), formant scale and
speaking rate (syllables/s) depend on its gender and face shape through fixed linear
coefficients plus Gaussian noise::

    value = base[gender] + per_width * z_width + per_length * z_length + noise_std * N(0, 1)

where ``z_width``, ``z_length`` are standardised face measures of the identity's neutral mesh
(expression 0): width = the distance between the ear vertices of the ARE "ER" line (20636,
34153) on the 53,215-vertex BFM (between keypoints 0 and 16 on other models), length = the
distance between keypoints 27 (top of the nose bridge) and 8 (chin), standardised by the mean and
standard deviation they have when ``shape ~ N(0, diag(shape_std^2))`` (first-order estimates;
:func:`measure_reference`). Each utterance's f0 is the identity's pitch times ``exp(N(0, 0.02^2))``.

How much a voice says about a face here: mostly gender (pitch and formants), which moves the face
along the width direction by ``2 x gender_width_shift`` standard deviations between the sexes,
and a little face width and length (within a gender, pitch correlates with ``z_width`` at about
0.8). Measured (examples/synthetic_end_to_end.sh, tests/cli/test_end_to_end.py): with the defaults
and 240 identities (180 training), a small supervised model beats the mean face on ER by ~20 %
(paired bootstrap interval above zero); with 32 training identities it did not (one world tried,
interval across zero), so the CI-sized test uses ``gender_width_shift=1.5``.

truth.h5
--------
File attributes: ``format="v2m-synth-truth"``, ``version=1``, ``seed``, the configuration
(``config.<field>``), the link (``link.<field>``, plus ``link_coefficients`` rows pitch /
formant_scale / rate, columns base_m, base_f, per_width, per_length, noise_std), the measure
reference (``measure.<...>``), the model (``model_source``, ``model_n_vertices``,
``model_genuine``). Datasets (``track_times=False``, so same seed -> same bytes):

- ``identity/`` (n rows): ``id``, ``name``, ``gender``, ``nationality``, ``set``, ``split``
  (str); ``shape`` (n, 40), ``shape_z`` (n, 40); ``face_width``, ``face_length`` (BFM units),
  ``face_width_z``, ``face_length_z``; ``pitch`` (Hz), ``formant_scale``, ``rate`` (syll/s) and
  their noise draws ``pitch_noise``, ``formant_scale_noise``, ``rate_noise`` (in the value's
  units: ``pitch = link mean + pitch_noise``); ``skin_color``, ``hair_color``, ``iris_color``
  (n, 3) in [0, 1]; ``hairline`` (n,).
- ``image/`` (m rows): ``identity_index`` (int), ``file`` (relative path), ``vggface_id``;
  ``expression`` (m, 10); ``yaw``, ``pitch``, ``roll`` (degrees), ``rotation`` (m, 3, 3),
  ``scale`` (px per BFM unit), ``translation`` (m, 2) px; ``light_dir`` (m, 3) (camera frame,
  towards the light), ``ambient``, ``diffuse``, ``light_color`` (m, 3); ``background_colors``
  (m, 2, 3), ``background_gradient`` (m,) bool, ``background_angle`` (degrees),
  ``background_noise``, ``sensor_noise``; ``landmarks`` (m, 68, 2) (0-based px), ``box`` (m, 4).
- ``utterance/`` (k rows): ``identity_index``, ``file``, ``video``; ``f0`` (Hz),
  ``formant_scale``, ``rate``, ``duration`` (s), ``speech_start``, ``speech_end`` (s; the first
  syllable's onset and the last one's end), ``n_syllables``, ``snr_db``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from v2m_bench.bfm import MorphableModel
from v2m_bench.errors import ValidationError
from v2m_bench.fileio import atomic_path, write_bytes, write_text
from v2m_bench.fileio import progress as progress_bar
from v2m_bench.render import project, render_mesh, view_rotation
from v2m_bench.split import split_of

__all__ = [
    "VoiceLink",
    "SynthConfig",
    "WorldSummary",
    "make_world",
    "face_measures",
    "measure_reference",
    "sample_shapes",
    "synthesize_speech",
    "TRUTH_FORMAT",
    "TRUTH_VERSION",
    "META_HEADER",
]

TRUTH_FORMAT = "v2m-synth-truth"
TRUTH_VERSION = 1
META_HEADER = "VoxCeleb1 ID\tVGGFace1 ID\tGender\tNationality\tSet"

#: Ear vertices of the ARE "ER" line on the 53,215-vertex BFM (v2m_bench.topology.ARE_PAIRS).
_ER_PAIR = (20636, 34153)
_BFM_N_VERTICES = 53215

#: Peterson & Barney (1952) average male formants F1-F3 (Hz) of eight vowels; F4 = 3400 Hz.
VOWEL_FORMANTS = np.array(
    [
        [270, 2290, 3010, 3400],  # i
        [390, 1990, 2550, 3400],  # I
        [530, 1840, 2480, 3400],  # E
        [660, 1720, 2410, 3400],  # ae
        [730, 1090, 2440, 3400],  # a
        [570, 840, 2410, 3400],  # o
        [300, 870, 2240, 3400],  # u
        [640, 1190, 2390, 3400],  # ^
    ],
    dtype=np.float64,
)
_FORMANT_BANDWIDTHS = np.array([80.0, 100.0, 140.0, 200.0])

_NATIONALITIES = ("USA", "UK", "Canada", "Australia", "Ireland", "India", "Germany", "France", "Spain", "Italy", "Mexico", "Brazil", "Norway", "Sweden")
_CONSONANTS = "bdfghjklmnprstvwz"
_VOWELS = "aeiou"
_ID_ALPHABET = string.ascii_letters + string.digits + "-_"


# ------------------------------------------------------------------------------------ configs
@dataclass(frozen=True)
class VoiceLink:
    """The known, noisy linear link from (gender, face shape) to an identity's voice.

    For each voice parameter ``p`` in (pitch, formant_scale, rate)::

        p = p_male | p_female + p_per_width * z_width + p_per_length * z_length + p_noise * N(0, 1)

    ``z_width``/``z_length`` are the standardised face width and length (see the module docs).
    Wider and longer faces (bigger heads, longer vocal tracts) get lower voices and lower
    formants; wider faces speak a little slower.

    Attributes
    ----------
    pitch_male, pitch_female : float
        Mean f0 in Hz at average face measures (120, 210).
    pitch_per_width, pitch_per_length : float
        Hz per standard deviation of face width / length (-10, -5).
    pitch_noise : float
        Standard deviation of the identity's pitch around the link, Hz (8).
    formant_male, formant_female, formant_per_width, formant_per_length, formant_noise : float
        Formant scale (multiplies the male reference formants): 1.0, 1.16, -0.03, -0.04, 0.02.
    rate_male, rate_female, rate_per_width, rate_per_length, rate_noise : float
        Speaking rate in syllables per second: 4.2, 4.6, -0.25, 0.0, 0.3.
    """

    pitch_male: float = 120.0
    pitch_female: float = 210.0
    pitch_per_width: float = -10.0
    pitch_per_length: float = -5.0
    pitch_noise: float = 8.0
    formant_male: float = 1.0
    formant_female: float = 1.16
    formant_per_width: float = -0.03
    formant_per_length: float = -0.04
    formant_noise: float = 0.02
    rate_male: float = 4.2
    rate_female: float = 4.6
    rate_per_width: float = -0.25
    rate_per_length: float = 0.0
    rate_noise: float = 0.3

    PARAMETERS = ("pitch", "formant_scale", "rate")
    COLUMNS = ("base_m", "base_f", "per_width", "per_length", "noise_std")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not np.isfinite(v):
                raise ValidationError(f"must be finite, found {v!r}", key=f"link.{f.name}")
            if f.name.endswith("_noise") and v < 0:
                raise ValidationError(f"must be >= 0, found {v!r}", key=f"link.{f.name}")

    def coefficients(self) -> np.ndarray:
        """(3, 5) float64: rows pitch, formant_scale, rate; columns :attr:`COLUMNS`."""
        return np.array(
            [
                [self.pitch_male, self.pitch_female, self.pitch_per_width, self.pitch_per_length, self.pitch_noise],
                [self.formant_male, self.formant_female, self.formant_per_width, self.formant_per_length, self.formant_noise],
                [self.rate_male, self.rate_female, self.rate_per_width, self.rate_per_length, self.rate_noise],
            ]
        )

    def mean(self, female, z_width, z_length) -> np.ndarray:
        """Noise-free link values.

        Parameters
        ----------
        female : array_like of bool, shape (B,)
        z_width, z_length : array_like, shape (B,)

        Returns
        -------
        ndarray, shape (B, 3): pitch (Hz), formant scale, rate (syllables/s).
        """
        c = self.coefficients()
        female = np.asarray(female, dtype=bool)[:, None]
        base = np.where(female, c[:, 1], c[:, 0])
        return base + np.asarray(z_width, np.float64)[:, None] * c[:, 2] + np.asarray(z_length, np.float64)[:, None] * c[:, 3]

    def sample(self, female, z_width, z_length, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Link values with noise: returns ``(values (B, 3), noise (B, 3))``, ``values = mean + noise``."""
        m = self.mean(female, z_width, z_length)
        noise = rng.standard_normal(m.shape) * self.coefficients()[:, 4]
        return m + noise, noise


@dataclass(frozen=True)
class SynthConfig:
    """How :func:`make_world` builds a world (all randomness comes from the seed).

    Attributes
    ----------
    images_per_identity, videos_per_identity, utterances_per_video : int
        5, 2, 3.
    image_size : int
        Side of the square photos in pixels (160).
    duration : (float, float)
        Range of utterance durations in seconds (3.0, 6.0), uniform.
    sample_rate : int
        16000.
    jpeg_quality : int
        95.
    supersample : int
        Rendering is done at this multiple of the size and averaged down (2).
    test_fraction : float
        Fraction of names starting with A-E (0.25, about the real 309/1251).
    female_fraction : float
        0.45 (the real 561/1251).
    shape_clip : float
        Shape coefficients are clipped to this many standard deviations (3).
    gender_width_shift : float
        Mean of the men's (women's: minus) whitened shape along the width direction (0.4).
    expression_scale : float
        Expression spread relative to the model's expression_std (0.5).
    yaw_std, yaw_max, pitch_std, pitch_max, roll_std, roll_max : float
        Head pose spread and clip in degrees (12, 30, 6, 15, 4, 10).
    face_fraction : (float, float)
        Width of the keypoints relative to the image width (0.42, 0.55).
    background : "random" or (r, g, b)
        Random solid/gradient backgrounds with noise, or one plain colour in [0, 1] with no noise.
    sensor_noise : (float, float)
        Range of the Gaussian pixel noise (std, in [0, 1] intensity) added to the whole photo.
    snr_db : (float, float)
        Range of the speech-to-background-noise ratio of an utterance, dB (20, 35).
    landmark_noise : float
        iid Gaussian noise added to each coordinate of the landmarks written to the ``.pts``
        files, as a fraction of ``sqrt(w h)`` of the landmarks' box (0: exact landmarks; 0.02 for
        "2 % noise"). It stands in for a landmark detector's error; drawn from its own random
        stream, so the rest of the world is the same, and ``truth.h5`` keeps the exact landmarks.
    link : VoiceLink
    """

    images_per_identity: int = 5
    videos_per_identity: int = 2
    utterances_per_video: int = 3
    image_size: int = 160
    duration: tuple = (3.0, 6.0)
    sample_rate: int = 16000
    jpeg_quality: int = 95
    supersample: int = 2
    test_fraction: float = 0.25
    female_fraction: float = 0.45
    shape_clip: float = 3.0
    gender_width_shift: float = 0.4
    expression_scale: float = 0.5
    yaw_std: float = 12.0
    yaw_max: float = 30.0
    pitch_std: float = 6.0
    pitch_max: float = 15.0
    roll_std: float = 4.0
    roll_max: float = 10.0
    face_fraction: tuple = (0.42, 0.55)
    background: Any = "random"
    sensor_noise: tuple = (0.004, 0.012)
    snr_db: tuple = (20.0, 35.0)
    landmark_noise: float = 0.0
    link: VoiceLink = field(default_factory=VoiceLink)

    def __post_init__(self):
        def bad(name, why):
            raise ValidationError(why, key=name)

        for name in ("images_per_identity", "videos_per_identity", "utterances_per_video"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                bad(name, f"must be an integer >= 1, found {v!r}")
        if not isinstance(self.image_size, (int, np.integer)) or not 32 <= self.image_size <= 4096:
            bad("image_size", f"must be an integer in 32..4096, found {self.image_size!r}")
        if not isinstance(self.supersample, (int, np.integer)) or not 1 <= self.supersample <= 4:
            bad("supersample", f"must be an integer in 1..4, found {self.supersample!r}")
        if not isinstance(self.jpeg_quality, (int, np.integer)) or not 1 <= self.jpeg_quality <= 100:
            bad("jpeg_quality", f"must be an integer in 1..100, found {self.jpeg_quality!r}")
        if self.sample_rate not in (8000, 16000, 22050, 32000, 44100, 48000):
            bad("sample_rate", f"must be a common audio rate, found {self.sample_rate!r}")
        for name, lo_min in (("duration", 0.3), ("face_fraction", 0.05), ("sensor_noise", 0.0), ("snr_db", -20.0)):
            v = getattr(self, name)
            try:
                lo, hi = (float(x) for x in v)
            except (TypeError, ValueError):
                bad(name, f"must be a (low, high) pair, found {v!r}")
            if not (np.isfinite(lo) and np.isfinite(hi) and lo_min <= lo <= hi):
                bad(name, f"must be a pair low <= high with low >= {lo_min}, found {v!r}")
        if self.face_fraction[1] > 0.7:
            bad("face_fraction", f"must stay <= 0.7 so the landmarks fit in the image, found {self.face_fraction!r}")
        for name in ("test_fraction", "female_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                bad(name, f"must be in [0, 1], found {v!r}")
        for name in ("shape_clip", "expression_scale", "yaw_std", "yaw_max", "pitch_std", "pitch_max", "roll_std", "roll_max"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v >= 0):
                bad(name, f"must be a finite number >= 0, found {v!r}")
        if not (np.isfinite(self.landmark_noise) and 0.0 <= self.landmark_noise <= 0.2):
            bad("landmark_noise", f"must be a number in [0, 0.2], found {self.landmark_noise!r}")
        if self.yaw_max > 60 or self.pitch_max > 40:
            bad("yaw_max", "yaw_max <= 60 and pitch_max <= 40 (the landmarks must stay on the visible face)")
        if not np.isfinite(self.gender_width_shift):
            bad("gender_width_shift", f"must be finite, found {self.gender_width_shift!r}")
        if not (isinstance(self.background, str) and self.background == "random"):
            b = np.asarray(self.background, dtype=np.float64) if not isinstance(self.background, str) else None
            if b is None or b.shape != (3,) or not np.all((b >= 0) & (b <= 1)):
                bad("background", f"must be 'random' or an (r, g, b) colour in [0, 1], found {self.background!r}")
        if not isinstance(self.link, VoiceLink):
            bad("link", f"must be a VoiceLink, found {type(self.link).__name__}")


@dataclass(frozen=True)
class WorldSummary:
    """What :func:`make_world` wrote.

    Attributes
    ----------
    root : Path
    n_identities, n_test, n_train : int
        Identities, and how many fall on each side of the A-E split.
    n_images, n_utterances : int
    audio_seconds : float
        Total duration of the audio written.
    ids, names, genders : tuple of str
        VoxCeleb1 ids, VGGFace1 names and genders, in id order.
    truth : Path
        The truth.h5 file.
    seconds : float
        Wall time the build took.
    """

    root: Path
    n_identities: int
    n_test: int
    n_train: int
    n_images: int
    n_utterances: int
    audio_seconds: float
    ids: tuple
    names: tuple
    genders: tuple
    truth: Path
    seconds: float

    def __str__(self) -> str:
        return (
            f"{self.root}: {self.n_identities} identities ({self.n_test} test A-E, {self.n_train} train F-Z), "
            f"{self.n_images} images, {self.n_utterances} utterances ({self.audio_seconds:.1f} s of audio) "
            f"in {self.seconds:.1f} s"
        )


def _rng(seed: int, *key: int) -> np.random.Generator:
    """An independent generator for one purpose (``key``) of a world seeded with ``seed``."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key)))


# ------------------------------------------------------------------------------ face measures
def _measure_pairs(model: MorphableModel) -> tuple[tuple[int, int], tuple[int, int]]:
    kp = np.asarray(model.keypoints)
    width = _ER_PAIR if model.n_vertices == _BFM_N_VERTICES else (int(kp[0]), int(kp[16]))
    length = (int(kp[27]), int(kp[8]))
    return width, length


def _pair_rows(model: MorphableModel, pair) -> tuple[np.ndarray, np.ndarray]:
    """Mean difference (3,) and basis difference (3, 40) of the vector from pair[1] to pair[0]."""
    a, b = pair
    d0 = model.mean[a].astype(np.float64) - model.mean[b].astype(np.float64)
    basis = model.shape_basis.astype(np.float64, copy=False)
    db = basis[3 * a : 3 * a + 3] - basis[3 * b : 3 * b + 3]
    return d0, db


def face_measures(model: MorphableModel, shape) -> dict[str, np.ndarray]:
    """Face width and length of neutral meshes (expression coefficients 0), in BFM units.

    Width: distance between the ER ear vertices (20636, 34153) on the 53,215-vertex BFM, between
    keypoints 0 and 16 on other models. Length: distance between keypoints 27 and 8.

    Parameters
    ----------
    model : MorphableModel
    shape : array_like, shape (B, 40) or (40,)

    Returns
    -------
    dict with ``width`` and ``length``: ndarray (B,) (or 0-d for 1-D input), float64.
    """
    s = np.asarray(shape, dtype=np.float64)
    single = s.ndim == 1
    s = np.atleast_2d(s)
    out = {}
    for name, pair in zip(("width", "length"), _measure_pairs(model)):
        d0, db = _pair_rows(model, pair)
        d = d0 + s @ db.T
        val = np.linalg.norm(d, axis=1)
        out[name] = val[0] if single else val
    return out


def measure_reference(model: MorphableModel) -> dict[str, Any]:
    """Mean and standard deviation of the face measures under ``shape ~ N(0, diag(shape_std^2))``.

    First-order (delta-method) estimates: for ``d(shape) = d0 + D shape``, the measure ``|d|`` has
    mean ``|d0|`` and standard deviation ``|(d0/|d0|)^T D diag(shape_std)|``.

    Returns
    -------
    dict: ``width_mean``, ``width_std``, ``length_mean``, ``length_std`` (BFM units),
    ``width_direction`` (40,) the unit vector of whitened shape space along which the width grows
    fastest, ``width_vertices``, ``length_vertices`` (the vertex pairs).
    """
    sd = model.shape_std.astype(np.float64)
    out: dict[str, Any] = {}
    pairs = _measure_pairs(model)
    for name, pair in zip(("width", "length"), pairs):
        d0, db = _pair_rows(model, pair)
        n0 = np.linalg.norm(d0)
        grad = (d0 / n0) @ db * sd  # d|d| / dz for whitened z
        out[f"{name}_mean"] = float(n0)
        out[f"{name}_std"] = float(np.linalg.norm(grad))
        if name == "width":
            out["width_direction"] = grad / np.linalg.norm(grad)
    out["width_vertices"] = pairs[0]
    out["length_vertices"] = pairs[1]
    return out


def sample_shapes(model: MorphableModel, female, rng: np.random.Generator, config: SynthConfig | None = None, reference=None):
    """Identity shapes as :func:`make_world` draws them.

    ``z ~ N(+-gender_width_shift * width_direction, I)`` (men +, women -), clipped to
    ``|z| <= shape_clip``, ``shape = shape_std * z``.

    Parameters
    ----------
    model : MorphableModel
    female : array_like of bool, shape (B,)
    rng : numpy.random.Generator
    config : SynthConfig, optional
    reference : dict, optional
        :func:`measure_reference` of the model (computed when omitted).

    Returns
    -------
    shape : ndarray (B, 40) float64
    z : ndarray (B, 40) float64
        The whitened coefficients.
    """
    config = config or SynthConfig()
    ref = reference or measure_reference(model)
    female = np.asarray(female, dtype=bool)
    sign = np.where(female, -1.0, 1.0)[:, None]
    z = rng.standard_normal((female.shape[0], model.n_shape)) + sign * config.gender_width_shift * ref["width_direction"]
    z = np.clip(z, -config.shape_clip, config.shape_clip)
    return z * model.shape_std.astype(np.float64), z


# ----------------------------------------------------------------------------- appearance
def _smooth(d: np.ndarray, edge: float) -> np.ndarray:
    """1 well inside (d << 0), 0 outside (d >> 0), a linear ramp of width ``edge`` around 0."""
    return np.clip(0.5 - d / edge, 0.0, 1.0)


def _segment_distance(p: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Distance (N,) from points (N, 2) to a polyline (K, 2)."""
    a, b = poly[:-1], poly[1:]
    ab = b - a
    ap = p[:, None, :] - a[None]
    t = np.clip(np.einsum("nkc,kc->nk", ap, ab) / np.maximum(np.einsum("kc,kc->k", ab, ab), 1e-30), 0.0, 1.0)
    closest = a[None] + t[..., None] * ab[None]
    return np.linalg.norm(p[:, None, :] - closest, axis=-1).min(axis=1)


def _polygon_sdf(p: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Signed distance (N,) to a closed polygon (K, 2): negative inside."""
    closed = np.concatenate([poly, poly[:1]])
    d = _segment_distance(p, closed)
    a, b = closed[:-1], closed[1:]
    x, y = p[:, 0:1], p[:, 1:2]
    cond = (a[None, :, 1] > y) != (b[None, :, 1] > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        xc = a[None, :, 0] + (y - a[None, :, 1]) * (b[None, :, 0] - a[None, :, 0]) / (b[None, :, 1] - a[None, :, 1])
    inside = (np.sum(cond & (x < xc), axis=1) % 2) == 1
    return np.where(inside, -d, d)


def _feature_maps(model: MorphableModel) -> dict[str, np.ndarray]:
    """Per-vertex weights in [0, 1] of facial features, from the mean face seen frontally."""
    mean = model.mean.astype(np.float64)
    p = mean[:, :2]
    kp = mean[np.asarray(model.keypoints), :2]
    unit = max(float(np.linalg.norm(kp[36] - kp[45])), 1e-9)  # outer eye corners
    from v2m_bench.render import mesh_vertex_normals

    front = _smooth(-mesh_vertex_normals(mean, model.triangles)[:, 2], 0.2)  # fades out where nz < 0
    maps: dict[str, np.ndarray] = {}
    brow = np.maximum(
        _smooth(_segment_distance(p, kp[17:22]) - 0.045 * unit, 0.02 * unit),
        _smooth(_segment_distance(p, kp[22:27]) - 0.045 * unit, 0.02 * unit),
    )
    maps["brow"] = brow * front
    eye = np.zeros(len(p))
    iris = np.zeros(len(p))
    pupil = np.zeros(len(p))
    lash = np.zeros(len(p))
    for ids, lid in (([36, 37, 38, 39, 40, 41], [36, 37, 38, 39]), ([42, 43, 44, 45, 46, 47], [42, 43, 44, 45])):
        poly = kp[ids]
        sdf = _polygon_sdf(p, poly)
        inside = _smooth(sdf, 0.01 * unit)
        width = np.linalg.norm(poly[0] - poly[3])
        centre = poly.mean(axis=0)
        r = np.linalg.norm(p - centre, axis=1)
        eye = np.maximum(eye, inside)
        iris = np.maximum(iris, inside * _smooth(r - 0.21 * width, 0.03 * width))
        pupil = np.maximum(pupil, inside * _smooth(r - 0.08 * width, 0.03 * width))
        lash = np.maximum(lash, _smooth(_segment_distance(p, kp[lid]) - 0.012 * unit, 0.01 * unit))
    maps["eye"] = eye * front
    maps["iris"] = iris * front
    maps["pupil"] = pupil * front
    maps["lash"] = lash * front
    lips = _smooth(_polygon_sdf(p, kp[48:60]), 0.015 * unit)
    mouth = _smooth(_polygon_sdf(p, kp[60:68]), 0.008 * unit)
    maps["lip"] = lips * front
    maps["mouth"] = mouth * front
    # height above the brows relative to the head's top, for the hairline
    top = p[:, 1].max()
    brow_y = kp[17:27, 1].max()
    maps["height"] = (p[:, 1] - brow_y) / max(top - brow_y, 1e-9)
    return maps


def _albedo(maps: dict[str, np.ndarray], skin, hair, iris_c, hairline: float) -> np.ndarray:
    """(N, 3) per-vertex colour of an identity."""
    skin = np.asarray(skin)
    col = np.broadcast_to(skin, (maps["eye"].shape[0], 3)).copy()

    def paint(w, c):
        nonlocal col
        col = col * (1.0 - w[:, None]) + np.asarray(c)[None] * w[:, None]

    paint(np.clip((maps["height"] - hairline) / 0.05, 0.0, 1.0), hair)
    paint(0.85 * maps["brow"], 0.8 * np.asarray(hair))
    paint(maps["lip"], skin * np.array([0.88, 0.58, 0.58]))
    paint(maps["mouth"], np.array([0.30, 0.10, 0.10]))
    paint(maps["eye"], np.array([0.92, 0.90, 0.87]))
    paint(maps["iris"], iris_c)
    paint(maps["pupil"], np.array([0.03, 0.03, 0.03]))
    paint(0.8 * maps["lash"], np.array([0.08, 0.06, 0.05]))
    return np.clip(col, 0.0, 1.0)


_SKIN_LIGHT = np.array([0.96, 0.80, 0.69])
_SKIN_DARK = np.array([0.40, 0.26, 0.18])
_HAIR = np.array([[0.07, 0.05, 0.04], [0.22, 0.14, 0.08], [0.40, 0.27, 0.15], [0.72, 0.58, 0.38], [0.50, 0.22, 0.10], [0.62, 0.62, 0.62]])
_IRIS = np.array([[0.25, 0.14, 0.07], [0.12, 0.08, 0.05], [0.25, 0.40, 0.60], [0.30, 0.42, 0.25]])


def _background(rng: np.random.Generator, size: int, config: SynthConfig) -> tuple[np.ndarray, dict]:
    if not isinstance(config.background, str):
        c = np.asarray(config.background, dtype=np.float64)
        info = dict(colors=np.stack([c, c]), gradient=False, angle=0.0, noise=0.0)
        return np.broadcast_to(c, (size, size, 3)).copy(), info
    c1 = rng.uniform(0.05, 0.95, 3)
    c2 = np.clip(c1 + rng.uniform(-0.35, 0.35, 3), 0.0, 1.0)
    gradient = bool(rng.random() < 0.5)
    angle = float(rng.uniform(0.0, 360.0))
    noise = float(rng.uniform(0.01, 0.04))
    u = np.linspace(-1.0, 1.0, size)
    gx, gy = np.meshgrid(u, u)
    if gradient:
        a = np.deg2rad(angle)
        w = np.clip(0.5 + 0.5 * (np.cos(a) * gx + np.sin(a) * gy), 0.0, 1.0)[..., None]
        bg = c1 * (1.0 - w) + c2 * w
    else:
        bg = np.broadcast_to(c1, (size, size, 3)).copy()
        c2 = c1.copy()
    bg = bg + rng.standard_normal((size, size, 3)) * noise
    return bg, dict(colors=np.stack([c1, c2]), gradient=gradient, angle=angle, noise=noise)


def _face_box(lm: np.ndarray, size: int) -> np.ndarray:
    lo, hi = lm.min(axis=0), lm.max(axis=0)
    w, h = hi - lo
    side = 1.3 * max(w, h)
    cx, cy = (lo + hi) / 2.0
    cy -= 0.1 * h
    box = np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])
    return np.clip(box, 0.0, size - 1.0)


def _render_photo(model, verts, albedo, rng: np.random.Generator, config: SynthConfig, kp_width: float):
    """One photo: returns (uint8 RGB image, info dict with the camera, light, background, landmarks, box)."""
    size = int(config.image_size)
    ss = int(config.supersample)
    yaw = float(np.clip(rng.normal(0.0, config.yaw_std), -config.yaw_max, config.yaw_max))
    pitch = float(np.clip(rng.normal(0.0, config.pitch_std), -config.pitch_max, config.pitch_max))
    roll = float(np.clip(rng.normal(0.0, config.roll_std), -config.roll_max, config.roll_max))
    rot = view_rotation(yaw, pitch, roll)
    frac = rng.uniform(*config.face_fraction)
    scale = float(frac * size / kp_width)
    kp3 = verts[np.asarray(model.keypoints)]
    lm0 = project(kp3, rot, scale, (0.0, 0.0))
    centre = (lm0.min(axis=0) + lm0.max(axis=0)) / 2.0
    shift = np.clip(rng.normal(0.0, 0.03 * size, 2), -0.06 * size, 0.06 * size)
    t = np.array([(size - 1) / 2.0, (size - 1) / 2.0]) + shift - centre
    lm = lm0 + t
    # keep every landmark at least 3 % of the image inside it
    pad = 0.03 * size
    lo, hi = lm.min(axis=0), lm.max(axis=0)
    fix = np.maximum(pad - lo, 0.0) - np.maximum(hi - (size - 1 - pad), 0.0)
    t = t + fix
    lm = lm + fix

    az = np.deg2rad(rng.uniform(-50.0, 50.0))
    el = np.deg2rad(rng.uniform(-10.0, 50.0))
    light = np.array([np.sin(az) * np.cos(el), np.sin(el), np.cos(az) * np.cos(el)])
    ambient = float(rng.uniform(0.3, 0.5))
    diffuse = float(rng.uniform(0.5, 0.75))
    tint = np.clip(1.0 + rng.normal(0.0, 0.02, 3), 0.94, 1.06)

    # supersampled render on black; area-average colour and coverage; composite on the background
    big = render_mesh(
        verts,
        model.triangles,
        colors=albedo * tint,
        rotation=rot,
        image_size=(size * ss, size * ss),
        scale=scale * ss,
        translation=ss * t + (ss - 1) / 2.0,
        light_dir=light,
        ambient=ambient,
        diffuse=diffuse,
        background=(0.0, 0.0, 0.0),
        shading="lambert",
        output="float",
    )
    col = big.image.astype(np.float64).reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    alpha = big.mask.astype(np.float64).reshape(size, ss, size, ss).mean(axis=(1, 3))[..., None]
    bg, bg_info = _background(rng, size, config)
    img = col + (1.0 - alpha) * bg
    sensor = float(rng.uniform(*config.sensor_noise))
    if sensor > 0:
        img = img + rng.standard_normal(img.shape) * sensor
    img = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    info = dict(
        yaw=yaw,
        pitch=pitch,
        roll=roll,
        rotation=rot,
        scale=scale,
        translation=t,
        light_dir=light,
        ambient=ambient,
        diffuse=diffuse,
        light_color=tint,
        background=bg_info,
        sensor_noise=sensor,
        landmarks=lm,
        box=_face_box(lm, size),
    )
    return img, info


# ---------------------------------------------------------------------------------- voices
def _vocal_tract(src: np.ndarray, tracks: np.ndarray, bandwidths: np.ndarray, hop: int, sr: int) -> np.ndarray:
    """Filter ``src`` by a time-varying cascade of formant resonators (short-time Fourier filtering).

    Frame ``k`` covers samples ``[k hop - hop/2, k hop + 3 hop/2)`` (centre ``(k + 0.5) hop``),
    is windowed by a periodic Hann window (50 % overlap: the windows sum to one), multiplied in
    the frequency domain by the response of the resonators with the formant frequencies
    ``tracks[k]`` (Hz), zero-padded to ``14 hop`` samples so the resonators' ringing is kept, and
    overlap-added. Each resonator is ``g / (1 - 2 r cos(theta) z^-1 + r^2 z^-2)`` with unit gain at
    0 Hz, ``r = exp(-pi B / sr)``, ``theta = 2 pi F / sr``.

    Parameters
    ----------
    src : ndarray (n,)
    tracks : ndarray (ceil(n / hop), K)
    bandwidths : ndarray (K,), Hz
    hop, sr : int

    Returns
    -------
    ndarray (n,)
    """
    n = src.shape[0]
    nb = tracks.shape[0]
    frame = 2 * hop
    nfft = 7 * frame
    win = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(frame) / frame)
    nf = nb + 2  # frames k = -1 .. nb
    c = hop - hop // 2
    padded = np.zeros((nf + 3) * hop)
    padded[2 * hop : 2 * hop + n] = src  # sample i sits at 2 hop + i
    starts = np.arange(nf) * hop + c  # frame k + 1 starts at k hop - hop // 2 (+ 2 hop)
    frames = padded[starts[:, None] + np.arange(frame)[None]] * win
    spec = np.fft.rfft(frames, nfft)
    trk = tracks[np.clip(np.arange(nf) - 1, 0, nb - 1)]  # (nf, K)
    r = np.exp(-np.pi * np.asarray(bandwidths, np.float64) / sr)  # (K,)
    theta = 2.0 * np.pi * np.minimum(trk, 0.45 * sr) / sr
    a1 = (-2.0 * r * np.cos(theta))[..., None]  # (nf, K, 1)
    a2 = (r * r)[None, :, None]
    z1 = np.exp(-2j * np.pi * np.arange(nfft // 2 + 1) / nfft)  # e^{-i w}
    resp = (1.0 + a1 + a2) / (1.0 + a1 * z1 + a2 * z1 * z1)
    spec *= np.prod(resp, axis=1)
    m = nfft // hop
    y = np.fft.irfft(spec, nfft).reshape(nf, m, hop)
    acc = np.zeros((nf + m, hop))
    for s_ in range(m):
        acc[s_ : s_ + nf] += y[:, s_]
    flat = acc.reshape(-1)  # flat[j] is padded sample c + j
    return flat[2 * hop - c : 2 * hop - c + n].copy()


def synthesize_speech(
    rng: np.random.Generator,
    f0: float,
    formant_scale: float = 1.0,
    rate: float = 4.4,
    duration: float = 4.0,
    sample_rate: int = 16000,
    snr_db: float = 30.0,
) -> tuple[np.ndarray, dict]:
    """One synthetic utterance (source-filter speech).

    Parameters
    ----------
    rng : numpy.random.Generator
    f0 : float
        The utterance's mean fundamental frequency, Hz (the contour varies about it in log scale).
    formant_scale : float
        Multiplies the male reference formants of every vowel (1.0 male, about 1.16 female).
    rate : float
        Syllables per second inside phrases.
    duration : float
        Seconds.
    sample_rate : int
    snr_db : float
        Speech RMS (over the speech span) to background-noise RMS, dB.

    Returns
    -------
    wave : ndarray (round(duration * sample_rate),) float32, within [-1, 1)
    info : dict
        ``speech_start``, ``speech_end`` (s), ``n_syllables``.
    """
    from scipy.signal import butter, lfilter, sosfilt

    sr = int(sample_rate)
    n = int(round(duration * sr))
    if not (f0 > 0 and formant_scale > 0 and rate > 0 and n > 0):
        raise ValidationError(f"needs f0, formant_scale, rate, duration > 0; got {f0}, {formant_scale}, {rate}, {duration}", key="speech")
    lead = rng.uniform(0.1, 0.25) * min(1.0, duration)
    tail = rng.uniform(0.1, 0.25) * min(1.0, duration)
    end_speech = duration - tail
    # syllable timeline: phrases of 3-8 syllables separated by pauses
    syl = []  # (start, end, vowel, consonant kind, loudness, phrase id)
    t = lead
    phrase = 0
    while True:
        k = int(rng.integers(3, 9))
        added = 0
        for _ in range(k):
            d = rng.uniform(0.75, 1.25) / rate
            if t + d > end_speech:
                break
            syl.append((t, t + d, int(rng.integers(len(VOWEL_FORMANTS))), int(rng.integers(0, 5)), rng.uniform(0.6, 1.0), phrase))
            t += d
            added += 1
        if added < k or t >= end_speech:
            break
        t += rng.uniform(0.15, 0.45)
        phrase += 1
    if not syl:  # very short utterance: one syllable over the available span
        syl.append((lead, end_speech, int(rng.integers(len(VOWEL_FORMANTS))), 0, 1.0, 0))

    block = max(sr // 200, 1)  # 5 ms control blocks
    nb = -(-n // block)
    ts = np.arange(n) / sr
    voice_env = np.zeros(n)
    noise_env = np.zeros(n)
    noise_kind = np.zeros(n, dtype=np.int64)
    targets = np.zeros((nb, 4))
    have = np.zeros(nb, dtype=bool)
    decl = np.zeros(n)
    phrases = {}
    for s, e, vowel, cons, loud, ph in syl:
        phrases.setdefault(ph, [s, e])
        phrases[ph][1] = e
        cons_d = 0.0 if cons == 0 else min(0.3 * (e - s), 0.08)
        vs, ve = s + cons_d, e
        i0, i1 = int(vs * sr), min(int(ve * sr), n)
        if i1 > i0:
            x = np.arange(i1 - i0) / sr
            att = np.clip(x / 0.025, 0.0, 1.0)
            rel = np.clip((ve - vs - x) / 0.04, 0.0, 1.0)
            env = loud * np.sin(0.5 * np.pi * att) ** 2 * np.sin(0.5 * np.pi * rel) ** 2
            voice_env[i0:i1] = np.maximum(voice_env[i0:i1], env)
        if cons:
            c0, c1 = int(s * sr), min(int((s + cons_d) * sr), n)
            if c1 > c0:
                x = np.arange(c1 - c0) / max(c1 - c0, 1)
                noise_env[c0:c1] = 0.35 * loud * np.sin(np.pi * x)
                noise_kind[c0:c1] = cons
        b0, b1 = int(s * sr) // block, min(int(e * sr) // block + 1, nb)
        targets[b0:b1] = VOWEL_FORMANTS[vowel] * formant_scale
        have[b0:b1] = True
    # formant tracks: hold the last target through pauses, then smooth (coarticulation, ~40 ms)
    first = VOWEL_FORMANTS[syl[0][2]] * formant_scale
    idx = np.where(have, np.arange(nb), -1)
    idx = np.maximum.accumulate(idx)
    tracks = np.where(idx[:, None] >= 0, targets[np.maximum(idx, 0)], first)
    kern = np.hanning(10)
    kern /= kern.sum()
    pad = np.concatenate([np.repeat(tracks[:1], 5, 0), tracks, np.repeat(tracks[-1:], 5, 0)])
    tracks = np.stack([np.convolve(pad[:, k], kern, mode="same")[5:-5] for k in range(4)], axis=1)

    # f0 contour: declination across each phrase (+6 % .. -6 %) and a slow wobble, in log scale
    for s, e in phrases.values():
        i0, i1 = int(s * sr), min(int(e * sr), n)
        if i1 > i0:
            decl[i0:i1] = np.linspace(0.06, -0.06, i1 - i0)
    wob_f = rng.uniform(0.7, 2.0)
    wob = 0.03 * np.sin(2.0 * np.pi * wob_f * ts + rng.uniform(0.0, 2.0 * np.pi))
    f0_t = f0 * np.exp(decl + wob)
    phase = np.cumsum(f0_t) / sr
    cycles = np.floor(phase)
    pulses = np.flatnonzero(np.diff(cycles, prepend=cycles[0]) > 0)
    period = sr / f0_t[pulses] if pulses.size else np.zeros(0)
    pos = np.round(pulses + rng.standard_normal(pulses.size) * 0.01 * period).astype(np.int64)
    keep = (pos >= 0) & (pos < n)
    src = np.zeros(n)
    np.add.at(src, pos[keep], (1.0 + 0.04 * rng.standard_normal(int(keep.sum()))))
    # glottal spectral tilt (two real poles) and lip radiation (first difference)
    src = lfilter([1.0], [1.0, -0.96], src)
    src = lfilter([1.0], [1.0, -0.9], src)
    src = np.diff(src, prepend=0.0)
    src = src + 0.015 * rng.standard_normal(n) * src.std()  # aspiration
    src *= voice_env

    out = _vocal_tract(src, tracks, _FORMANT_BANDWIDTHS * np.sqrt(formant_scale), block, sr)

    # onset consonants: band-limited noise (1 s, 2 sh, 3 f, 4 burst)
    if noise_env.any():
        white = rng.standard_normal(n)
        bands = {1: (3800, 7000), 2: (2000, 4500), 3: (1000, 7000), 4: (500, 5000)}
        for kind, (lo, hi) in bands.items():
            sel = noise_kind == kind
            if sel.any():
                hi = min(hi, 0.45 * sr)
                nb_sos = butter(2, [lo, hi], btype="band", fs=sr, output="sos")
                out += sosfilt(nb_sos, white) * noise_env * sel
    # level: speech RMS about -20 dBFS, then background noise at the SNR
    s0, s1 = int(syl[0][0] * sr), min(int(syl[-1][1] * sr), n)
    active = out[s0:s1] if s1 > s0 else out
    rms = float(np.sqrt(np.mean(active**2))) or 1.0
    out *= 0.1 * rng.uniform(0.7, 1.4) / rms
    rms = float(np.sqrt(np.mean(out[s0:s1] ** 2))) if s1 > s0 else 0.1
    bgn = lfilter([1.0], [1.0, -0.5], rng.standard_normal(n))
    bgn *= rms / (10.0 ** (snr_db / 20.0)) / max(float(bgn.std()), 1e-12)
    out += bgn
    peak = float(np.max(np.abs(out)))
    if peak > 0.95:
        out *= 0.95 / peak
    info = dict(speech_start=float(syl[0][0]), speech_end=float(syl[-1][1]), n_syllables=len(syl))
    return out.astype(np.float32), info


# -------------------------------------------------------------------------------- identities
def _make_name(rng: np.random.Generator, first: str) -> str:
    def word(start: str, n_syl: int) -> str:
        s = start.upper()
        vowel_next = start.lower() not in _VOWELS
        for _ in range(n_syl * 2 - 1):
            s += rng.choice(list(_VOWELS if vowel_next else _CONSONANTS))
            vowel_next = not vowel_next
        return s

    given = word(first, int(rng.integers(2, 4)))
    surname = word(rng.choice(list(string.ascii_uppercase)), int(rng.integers(2, 4)))
    return f"{given}_{surname}"


def _make_identities(n: int, seed: int, config: SynthConfig) -> list[dict]:
    rng = _rng(seed, 0)
    if n >= 2:
        n_test = int(np.clip(round(config.test_fraction * n), 1, n - 1))
    else:
        n_test = int(round(config.test_fraction * n))
    letters = []
    for count, pool in ((n_test, "ABCDE"), (n - n_test, "FGHIJKLMNOPQRSTUVWXYZ")):
        # spread over the pool: a random offset, then evenly spaced
        off = rng.random()
        letters += [pool[int((k + off) * len(pool) / max(count, 1)) % len(pool)] for k in range(count)]
    names: list[str] = []
    seen = set()
    for letter in letters:
        name = _make_name(rng, letter)
        while name in seen:
            name = _make_name(rng, letter)
        seen.add(name)
        names.append(name)
    names.sort()
    n_f = int(round(config.female_fraction * n))
    if n >= 2:
        n_f = int(np.clip(n_f, 1, n - 1))
    genders = np.array(["f"] * n_f + ["m"] * (n - n_f))[rng.permutation(n)]
    nat = rng.integers(len(_NATIONALITIES), size=n)
    out = []
    for i, name in enumerate(names):
        out.append(
            dict(
                id=f"id{10001 + i}",
                name=name,
                gender=str(genders[i]),
                nationality=_NATIONALITIES[int(nat[i])],
                set="test" if name[0] == "E" else "dev",
                split=split_of(name),
            )
        )
    return out


def _video_id(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list(_ID_ALPHABET), size=11))


# ------------------------------------------------------------------------------------ writing
def _write_bytes(path: Path, data: bytes) -> None:
    write_bytes(path, data)


def _encode_jpeg(img: np.ndarray, quality: int, path: Path) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img[..., ::-1]), [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:  # pragma: no cover - cv2 failure
        raise ValidationError("cannot encode the JPEG", path=str(path))
    return buf.tobytes()


def _encode_wav(wave: np.ndarray, sr: int) -> bytes:
    import soundfile as sf

    bio = io.BytesIO()
    sf.write(bio, wave, sr, subtype="PCM_16", format="WAV")
    return bio.getvalue()


def _write_truth(path: Path, seed: int, model: MorphableModel, config: SynthConfig, ref: dict, ident: dict, img: dict, utt: dict) -> None:
    import h5py

    str_dt = h5py.string_dtype("utf-8")

    def put(group, key, value):
        arr = np.asarray(value)
        if arr.dtype.kind in "US" or arr.dtype == object:
            group.create_dataset(key, data=np.array([str(x) for x in arr.reshape(-1)], dtype=object).reshape(arr.shape), dtype=str_dt, track_times=False)
        else:
            group.create_dataset(key, data=arr, track_times=False)

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = TRUTH_FORMAT
            f.attrs["version"] = np.int64(TRUTH_VERSION)
            f.attrs["seed"] = np.int64(seed)
            f.attrs["generator"] = "v2m_data.synth.make_world"
            f.attrs["model_source"] = str(model.source)
            f.attrs["model_n_vertices"] = np.int64(model.n_vertices)
            f.attrs["model_genuine"] = bool(model.is_genuine)
            for fl in dataclasses.fields(config):
                if fl.name == "link":
                    continue
                v = getattr(config, fl.name)
                f.attrs[f"config.{fl.name}"] = str(v) if isinstance(v, str) else np.asarray(v)
            for fl in dataclasses.fields(config.link):
                f.attrs[f"link.{fl.name}"] = float(getattr(config.link, fl.name))
            f.attrs["link_coefficients"] = config.link.coefficients()
            f.attrs["link_rows"] = np.array(VoiceLink.PARAMETERS, dtype=object)
            f.attrs["link_columns"] = np.array(VoiceLink.COLUMNS, dtype=object)
            f.attrs["link_formula"] = "value = base[gender] + per_width * face_width_z + per_length * face_length_z + noise"
            for k in ("width_mean", "width_std", "length_mean", "length_std"):
                f.attrs[f"measure.{k}"] = float(ref[k])
            f.attrs["measure.width_vertices"] = np.asarray(ref["width_vertices"], np.int64)
            f.attrs["measure.length_vertices"] = np.asarray(ref["length_vertices"], np.int64)
            f.attrs["measure.width_direction"] = np.asarray(ref["width_direction"])
            for gname, table in (("identity", ident), ("image", img), ("utterance", utt)):
                g = f.create_group(gname)
                for key, value in table.items():
                    put(g, key, value)


def make_world(
    out: str | os.PathLike,
    n_identities: int,
    seed: int,
    model: MorphableModel,
    *,
    config: SynthConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **options,
) -> WorldSummary:
    """Write a synthetic world (VoxCeleb1 + VGGFace layout, plus truth.h5); see the module docs.

    Parameters
    ----------
    out : str or path-like
        Folder to write; created if missing. It must be empty unless ``overwrite`` (files of a
        previous build are then replaced, others left alone).
    n_identities : int
        Number of made-up people (>= 1; >= 2 populates both sides of the A-E split).
    seed : int
        Everything is drawn from it: the same seed, model and options give the same bytes.
    model : MorphableModel
        The 3DMM whose faces are rendered (the BFM; any model with 68 keypoints works).
    config : SynthConfig, optional
    overwrite : bool
    progress : bool
        A tqdm bar over identities (also off when stderr is not a terminal).
    **options
        Fields of :class:`SynthConfig` overriding ``config`` (e.g. ``images_per_identity=2``,
        ``image_size=128``, ``duration=(1.0, 1.0)``).

    Returns
    -------
    WorldSummary

    Raises
    ------
    ValidationError
        Bad arguments, or ``out`` is not empty and ``overwrite`` is false.
    """
    started = time.perf_counter()
    config = config or SynthConfig()
    names = {f.name for f in dataclasses.fields(SynthConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValidationError(f"unknown option; expected one of {', '.join(sorted(names))}", key=unknown[0])
    if options:
        config = dataclasses.replace(config, **options)
    if not isinstance(n_identities, (int, np.integer)) or isinstance(n_identities, bool) or not 1 <= n_identities <= 9000:
        raise ValidationError(f"must be an integer in 1..9000, found {n_identities!r}", key="n_identities")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValidationError(f"must be an integer >= 0, found {seed!r}", key="seed")
    if model.keypoints.shape != (68,):
        raise ValidationError(f"the model needs 68 keypoints, found {model.keypoints.shape}", key="model")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise ValidationError("exists and is not a folder", path=str(root))
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise ValidationError("folder is not empty (pass overwrite=True to write over a previous world)", path=str(root))
    root.mkdir(parents=True, exist_ok=True)

    ref = measure_reference(model)
    maps = _feature_maps(model)
    people = _make_identities(int(n_identities), int(seed), config)
    n = len(people)
    female = np.array([p["gender"] == "f" for p in people])
    shapes, shape_z = sample_shapes(model, female, _rng(seed, 1), config, ref)
    meas = face_measures(model, shapes)
    zw = (meas["width"] - ref["width_mean"]) / ref["width_std"]
    zl = (meas["length"] - ref["length_mean"]) / ref["length_std"]
    voice, voice_noise = config.link.sample(female, zw, zl, _rng(seed, 2))
    voice[:, 0] = np.maximum(voice[:, 0], 50.0)
    voice[:, 1] = np.maximum(voice[:, 1], 0.6)
    voice[:, 2] = np.maximum(voice[:, 2], 1.5)

    skin = np.zeros((n, 3))
    hair = np.zeros((n, 3))
    iris = np.zeros((n, 3))
    hairline = np.zeros(n)
    for i in range(n):
        r = _rng(seed, 3, i)
        tone = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * r.random()
        skin[i] = np.clip(tone * r.uniform(0.95, 1.05) * np.array([1.0 + r.normal(0.0, 0.03), 1.0, 1.0]), 0.0, 1.0)
        hair[i] = np.clip(_HAIR[r.integers(len(_HAIR))] * (1.0 + r.normal(0.0, 0.08, 3)), 0.0, 1.0)
        iris[i] = _IRIS[r.integers(len(_IRIS))]
        hairline[i] = r.uniform(0.35, 0.65) if r.random() < 0.85 else 2.0  # 2.0 = bald

    vgg_files = root / "vggface" / "files"
    vgg_files.mkdir(parents=True, exist_ok=True)
    kp = np.asarray(model.keypoints)
    img_rows: dict[str, list] = {k: [] for k in (
        "identity_index", "file", "vggface_id", "expression", "yaw", "pitch", "roll", "rotation", "scale", "translation",
        "light_dir", "ambient", "diffuse", "light_color", "background_colors", "background_gradient", "background_angle",
        "background_noise", "sensor_noise", "landmarks", "box")}
    utt_rows: dict[str, list] = {k: [] for k in (
        "identity_index", "file", "video", "f0", "formant_scale", "rate", "duration", "speech_start", "speech_end",
        "n_syllables", "snr_db")}
    audio_seconds = 0.0

    from v2m_data.images import write_pts

    bar = progress_bar(total=n, desc="synthetic identities", unit="id", enabled=None) if progress else None
    for i, person in enumerate(people):
        name = person["name"]
        # ---------------------------------------------------------------- images
        r_img = _rng(seed, 4, i)
        exprs = model.expression_mean.astype(np.float64) + config.expression_scale * model.expression_std.astype(np.float64) * r_img.standard_normal((config.images_per_identity, model.n_expression))
        neutral_kp = model.vertices(shapes[i])[kp]
        kp_width = float(np.ptp(neutral_kp[:, 0]))
        albedo = _albedo(maps, skin[i], hair[i], iris[i], hairline[i])
        lines = []
        r_noise = _rng(seed, 7, i)
        for j in range(config.images_per_identity):
            vid = f"{j + 1:08d}"
            verts = model.vertices(shapes[i], exprs[j]).astype(np.float64)
            img, info = _render_photo(model, verts, albedo, r_img, config, kp_width)
            rel = Path("vggface") / "images" / name / f"{vid}.jpg"
            _write_bytes(root / rel, _encode_jpeg(img, config.jpeg_quality, root / rel))
            written = info["landmarks"]
            if config.landmark_noise > 0:
                lb = np.ptp(written, axis=0)
                written = written + config.landmark_noise * np.sqrt(lb[0] * lb[1]) * r_noise.standard_normal(written.shape)
            write_pts(root / rel.with_suffix(".pts"), written)
            yaw = info["yaw"]
            pose = 3.0 if abs(yaw) <= 20.0 else (1.0 if yaw < 0 else 2.0)
            score = 2.5 + 1.5 * (1.0 - abs(yaw) / 45.0) + 0.2 * r_img.standard_normal()
            l, t, rr, b = info["box"]
            lines.append(f"{vid} http://example.invalid/vggface/{name}/{vid}.jpg {l:.2f} {t:.2f} {rr:.2f} {b:.2f} {pose:.2f} {score:.3f} 1\n")
            bg = info["background"]
            for k, v in (
                ("identity_index", i), ("file", rel.as_posix()), ("vggface_id", vid), ("expression", exprs[j]),
                ("yaw", info["yaw"]), ("pitch", info["pitch"]), ("roll", info["roll"]), ("rotation", info["rotation"]),
                ("scale", info["scale"]), ("translation", info["translation"]), ("light_dir", info["light_dir"]),
                ("ambient", info["ambient"]), ("diffuse", info["diffuse"]), ("light_color", info["light_color"]),
                ("background_colors", bg["colors"]), ("background_gradient", bg["gradient"]),
                ("background_angle", bg["angle"]), ("background_noise", bg["noise"]),
                ("sensor_noise", info["sensor_noise"]), ("landmarks", info["landmarks"]), ("box", info["box"]),
            ):
                img_rows[k].append(v)
        write_text(vgg_files / f"{name}.txt", "".join(lines))
        # ---------------------------------------------------------------- voices
        r_voc = _rng(seed, 5, i)
        videos = []
        while len(videos) < config.videos_per_identity:
            v = _video_id(r_voc)
            if v not in videos:
                videos.append(v)
        for video in sorted(videos):
            for u in range(config.utterances_per_video):
                dur = float(r_voc.uniform(*config.duration))
                f0 = float(voice[i, 0] * np.exp(r_voc.normal(0.0, 0.02)))
                snr = float(r_voc.uniform(*config.snr_db))
                wave, sinfo = synthesize_speech(r_voc, f0, voice[i, 1], voice[i, 2], dur, config.sample_rate, snr)
                rel = Path("wav") / person["id"] / video / f"{u + 1:05d}.wav"
                _write_bytes(root / rel, _encode_wav(wave, config.sample_rate))
                audio_seconds += wave.shape[0] / config.sample_rate
                for k, v in (
                    ("identity_index", i), ("file", rel.as_posix()), ("video", video), ("f0", f0),
                    ("formant_scale", voice[i, 1]), ("rate", voice[i, 2]), ("duration", wave.shape[0] / config.sample_rate),
                    ("speech_start", sinfo["speech_start"]), ("speech_end", sinfo["speech_end"]),
                    ("n_syllables", sinfo["n_syllables"]), ("snr_db", snr),
                ):
                    utt_rows[k].append(v)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    meta = [META_HEADER] + [f"{p['id']}\t{p['name']}\t{p['gender']}\t{p['nationality']}\t{p['set']}" for p in people]
    write_text(root / "vox1_meta.csv", "\n".join(meta) + "\n")

    ident = {
        "id": [p["id"] for p in people],
        "name": [p["name"] for p in people],
        "gender": [p["gender"] for p in people],
        "nationality": [p["nationality"] for p in people],
        "set": [p["set"] for p in people],
        "split": [p["split"] for p in people],
        "shape": shapes,
        "shape_z": shape_z,
        "face_width": meas["width"],
        "face_length": meas["length"],
        "face_width_z": zw,
        "face_length_z": zl,
        "pitch": voice[:, 0],
        "formant_scale": voice[:, 1],
        "rate": voice[:, 2],
        "pitch_noise": voice_noise[:, 0],
        "formant_scale_noise": voice_noise[:, 1],
        "rate_noise": voice_noise[:, 2],
        "skin_color": skin,
        "hair_color": hair,
        "iris_color": iris,
        "hairline": hairline,
    }
    img = {k: np.asarray(v) for k, v in img_rows.items()}
    img["expression"] = img["expression"].astype(np.float32)
    utt = {k: np.asarray(v) for k, v in utt_rows.items()}
    truth = root / "truth.h5"
    _write_truth(truth, int(seed), model, config, ref, ident, img, utt)
    n_test = sum(p["split"] == "test" for p in people)
    return WorldSummary(
        root=root,
        n_identities=n,
        n_test=n_test,
        n_train=n - n_test,
        n_images=len(img_rows["file"]),
        n_utterances=len(utt_rows["file"]),
        audio_seconds=audio_seconds,
        ids=tuple(p["id"] for p in people),
        names=tuple(p["name"] for p in people),
        genders=tuple(p["gender"] for p in people),
        truth=truth,
        seconds=time.perf_counter() - started,
    )
