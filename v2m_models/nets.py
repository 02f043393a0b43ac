"""Networks of voice2mesh: voice encoder, voice->face GAN parts and the image->3DMM regressor.

Every module here is a plain ``torch.nn.Module``. Shapes below use ``B`` for the batch size,
``T`` for the number of spectrogram frames, ``H, W`` for image height and width.

Modules
-------
VoiceEncoder
    Wen et al. (2019) voice encoder: 64-band log-mel (B, 64, T) -> 64-d embedding.
SpeakerClassifier
    Encoder + linear layer, for pretraining the encoder with cross-entropy over speakers.
CoefficientHead, SupervisedModel
    The supervised Voice2Mesh model: encoder -> linear heads for 40 shape and 10 expression
    (normalised) 3DMM coefficients.
Generator
    Wen et al. (2019) voice-embedding -> 64x64 face generator.
FaceTrunk, Discriminator, IdentityClassifier
    Wen et al. (2019) face trunk (64x64 image -> 64-d) and its real/fake and identity heads.
MobileNetV2, ImageTo3DMM
    MobileNetV2 regressing the 62 3DDFA parameters (12 pose + 40 shape + 10 expression) from a
    120x120 face image, with the intermediate features that the distillation losses need.

Checkpoint compatibility
------------------------
``VoiceEncoder.model``, ``Generator.model`` and ``FaceTrunk.model`` are ``nn.Sequential`` stacks
whose layer order matches the released Wen et al. / Cross-Modal-Perceptionist checkpoints, so
those state dicts load into them directly (the generator's last layer is therefore a 1x1
*transposed* convolution, mathematically a 1x1 convolution). ``MobileNetV2.features`` follows the
usual MobileNetV2 layer layout (stem, 17 inverted-residual blocks, 1x1 last conv).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from v2m_bench.errors import ValidationError

__all__ = [
    "VOICE_CHANNELS",
    "MOBILENET_V2_SETTING",
    "make_divisible",
    "VoiceEncoder",
    "SpeakerClassifier",
    "CoefficientHead",
    "SupervisedModel",
    "Generator",
    "FaceTrunk",
    "Discriminator",
    "IdentityClassifier",
    "FaceCritic",
    "Frozen",
    "InvertedResidual",
    "MobileNetV2",
    "ImageTo3DMM",
    "conv_output_length",
    "count_parameters",
]

#: Channels of the voice encoder: input bands, four hidden widths, embedding size.
VOICE_CHANNELS: tuple[int, ...] = (64, 256, 384, 576, 864, 64)

#: MobileNetV2 inverted-residual configuration: (expansion t, channels c, repeats n, stride s).
MOBILENET_V2_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``module``.

    Parameters
    ----------
    module : nn.Module
    trainable_only : bool
        Count only parameters with ``requires_grad``.

    Returns
    -------
    int
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def conv_output_length(lengths: torch.Tensor, n_layers: int = 5) -> torch.Tensor:
    """Valid lengths after ``n_layers`` 1-D convolutions with kernel 3, stride 2, padding 1.

    Each such layer maps a length ``L`` to ``floor((L - 1) / 2) + 1 = ceil(L / 2)``.

    Parameters
    ----------
    lengths : torch.Tensor, shape (B,), integer
        Valid input frames per sample.
    n_layers : int

    Returns
    -------
    torch.Tensor, shape (B,), int64
    """
    out = lengths.to(torch.int64)
    for _ in range(n_layers):
        out = torch.div(out - 1, 2, rounding_mode="floor") + 1
    return out


# --------------------------------------------------------------------------------------------
# Voice side
# --------------------------------------------------------------------------------------------


class VoiceEncoder(nn.Module):
    """Wen et al. (2019) voice encoder.

    Five 1-D convolutions over time (kernel 3, stride 2, padding 1), channels
    64 -> 256 -> 384 -> 576 -> 864 -> 64; the first four have no bias and are followed by
    BatchNorm + ReLU, the last has a bias and no activation. The output frames are averaged over
    time and (by default) L2-normalised.

    Parameters
    ----------
    channels : sequence of int
        ``(n_bands, h1, h2, h3, h4, embed_dim)``; defaults to :data:`VOICE_CHANNELS`.
    normalize : bool
        Default for ``forward(normalize=None)``: L2-normalise the embedding.

    Notes
    -----
    Variable lengths: pass ``lengths`` (valid frames per sample of a zero-padded batch). Every
    layer's output is then zeroed beyond the sample's valid length (``ceil(L / 2)`` per layer)
    and the time average runs over the valid output frames only. In ``eval()`` mode this gives
    the same embedding as running each utterance alone without padding. In ``train()`` mode the
    BatchNorm batch statistics also see the padded (zeroed) frames; train on equal-length crops
    (Wen et al. crop 300-800 frames per batch) to avoid that.
    """

    def __init__(self, channels: Sequence[int] = VOICE_CHANNELS, normalize: bool = True):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 6:
            raise ValidationError(f"expected 6 channel counts, got {len(channels)}", key="channels")
        self.channels = channels
        self.normalize = bool(normalize)
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [
                nn.Conv1d(channels[i], channels[i + 1], 3, 2, 1, bias=False),
                nn.BatchNorm1d(channels[i + 1]),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Conv1d(channels[4], channels[5], 3, 2, 1, bias=True))
        self.model = nn.Sequential(*layers)

    @property
    def embed_dim(self) -> int:
        """Size of the output embedding (64)."""
        return self.channels[-1]

    def forward(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor | None = None,
        normalize: bool | None = None,
    ) -> torch.Tensor:
        """Embed a batch of normalised log-mel spectrograms.

        Parameters
        ----------
        x : torch.Tensor, shape (B, 64, T), float
            Per-utterance mean/variance normalised log-mel filterbanks, zero-padded after each
            sample's valid length when ``lengths`` is given. Any ``T >= 1``.
        lengths : torch.Tensor, shape (B,), integer, optional
            Valid frames per sample, ``1 <= lengths <= T``. None: every frame is valid.
        normalize : bool, optional
            L2-normalise the output; None uses the constructor's ``normalize``.

        Returns
        -------
        torch.Tensor, shape (B, 64), float
            The voice embedding (unit norm when normalised).
        """
        if x.dim() != 3 or x.shape[1] != self.channels[0]:
            raise ValidationError(
                f"expected (B, {self.channels[0]}, T) log-mel input, got {tuple(x.shape)}", key="x"
            )
        if x.shape[2] < 1:
            raise ValidationError("need at least one frame", key="x")
        normalize = self.normalize if normalize is None else bool(normalize)
        if lengths is None:
            h = self.model(x)
            emb = h.mean(dim=2)
        else:
            lengths = torch.as_tensor(lengths, device=x.device).to(torch.int64).reshape(-1)
            if lengths.shape[0] != x.shape[0]:
                raise ValidationError(
                    f"{lengths.shape[0]} lengths for a batch of {x.shape[0]}", key="lengths"
                )
            if bool((lengths < 1).any()) or bool((lengths > x.shape[2]).any()):
                raise ValidationError(f"lengths must lie in [1, {x.shape[2]}]", key="lengths")
            cur = lengths
            h = x * _time_mask(cur, x.shape[2], x.dtype).unsqueeze(1)
            for layer in self.model:
                h = layer(h)
                if isinstance(layer, nn.Conv1d):
                    cur = conv_output_length(cur, 1)
                if isinstance(layer, (nn.ReLU, nn.Conv1d)):
                    # zero the frames past the valid length (after BN they are no longer zero)
                    h = h * _time_mask(cur, h.shape[2], h.dtype).unsqueeze(1)
            emb = h.sum(dim=2) / cur.to(h.dtype).unsqueeze(1)
        if normalize:
            emb = F.normalize(emb, dim=1)
        return emb


def _time_mask(lengths: torch.Tensor, t: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, t) mask, 1 for frames < length."""
    return (torch.arange(t, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)).to(dtype)


class SpeakerClassifier(nn.Module):
    """Voice encoder + ``Linear(64, n_speakers)``, for pretraining with cross-entropy.

    Parameters
    ----------
    n_speakers : int
    encoder : VoiceEncoder, optional
        A new one when None.
    normalize : bool
        Feed the L2-normalised embedding to the classifier. Default False: a linear classifier on
        unit-norm inputs needs a temperature to train well, so the raw embedding is used and the
        normalisation applied downstream (as Wen et al. do).
    """

    def __init__(self, n_speakers: int, encoder: VoiceEncoder | None = None, normalize: bool = False):
        super().__init__()
        if int(n_speakers) < 1:
            raise ValidationError(f"need at least one speaker, got {n_speakers}", key="n_speakers")
        self.encoder = encoder if encoder is not None else VoiceEncoder()
        self.normalize = bool(normalize)
        self.classifier = nn.Linear(self.encoder.embed_dim, int(n_speakers))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Speaker logits.

        Parameters
        ----------
        x : torch.Tensor, shape (B, 64, T)
        lengths : torch.Tensor, shape (B,), optional

        Returns
        -------
        torch.Tensor, shape (B, n_speakers)
            Unnormalised logits (use ``F.cross_entropy``).
        """
        return self.classifier(self.encoder(x, lengths, normalize=self.normalize))


class CoefficientHead(nn.Module):
    """Linear heads from a voice embedding to normalised 3DMM coefficients.

    Parameters
    ----------
    in_dim : int
        Embedding size (64).
    n_shape, n_exp : int
        Number of shape (40) and expression (10) coefficients.
    """

    def __init__(self, in_dim: int = 64, n_shape: int = 40, n_exp: int = 10):
        super().__init__()
        self.shape_head = nn.Linear(in_dim, n_shape)
        self.expression_head = nn.Linear(in_dim, n_exp)

    def forward(self, emb: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predict coefficients.

        Parameters
        ----------
        emb : torch.Tensor, shape (B, in_dim)

        Returns
        -------
        dict
            ``shape`` (B, n_shape), ``expression`` (B, n_exp) and ``coefficients``
            (B, n_shape + n_exp), their concatenation; all in the normalised (whitened)
            parameter space, i.e. (param - mean) / std of the 3DDFA statistics.
        """
        shape = self.shape_head(emb)
        expression = self.expression_head(emb)
        return {
            "shape": shape,
            "expression": expression,
            "coefficients": torch.cat([shape, expression], dim=1),
        }


class SupervisedModel(nn.Module):
    """Supervised Voice2Mesh: voice encoder -> :class:`CoefficientHead`.

    Parameters
    ----------
    encoder : VoiceEncoder, optional
        A (usually speaker-pretrained) encoder; a new one when None.
    freeze_encoder : bool
        Keep the encoder fixed: its parameters get ``requires_grad=False`` and it stays in eval
        mode (BatchNorm running statistics untouched) even when the model is put in train mode.
    normalize_embedding : bool
        Feed the L2-normalised embedding to the heads (default, as the released model does).
    n_shape, n_exp : int
    """

    def __init__(
        self,
        encoder: VoiceEncoder | None = None,
        freeze_encoder: bool = False,
        normalize_embedding: bool = True,
        n_shape: int = 40,
        n_exp: int = 10,
    ):
        super().__init__()
        self.encoder = encoder if encoder is not None else VoiceEncoder()
        self.head = CoefficientHead(self.encoder.embed_dim, n_shape, n_exp)
        self.normalize_embedding = bool(normalize_embedding)
        self.freeze_encoder = bool(freeze_encoder)
        if self.freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> "SupervisedModel":
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Predict normalised shape and expression coefficients from speech.

        Parameters
        ----------
        x : torch.Tensor, shape (B, 64, T)
        lengths : torch.Tensor, shape (B,), optional

        Returns
        -------
        dict
            ``shape`` (B, 40), ``expression`` (B, 10), ``coefficients`` (B, 50) and
            ``embedding`` (B, 64).
        """
        emb = self.encoder(x, lengths, normalize=self.normalize_embedding)
        out = self.head(emb)
        out["embedding"] = emb
        return out


# --------------------------------------------------------------------------------------------
# Voice -> face GAN (Wen et al. 2019)
# --------------------------------------------------------------------------------------------


class Generator(nn.Module):
    """Wen et al. (2019) face generator: 64-d embedding -> 64x64 RGB image.

    Transposed convolutions 64 -> 1024 (4x4 kernel on the 1x1 input: 4x4), then 512, 256, 128,
    64 (4x4 kernel, stride 2, padding 1: each doubles the size, to 64x64), ReLU after each, then
    a 1x1 convolution to 3 channels.

    Parameters
    ----------
    in_dim : int
        Embedding size (64).
    channels : sequence of int
        The five hidden widths, default (1024, 512, 256, 128, 64).
    tanh : bool
        Squash the output with tanh so images lie in [-1, 1], the range the real faces are
        scaled to. Default True. Wen et al.'s released generator has no output activation (its
        outputs are unbounded and only trained towards [-1, 1]); use ``tanh=False`` to load and
        reproduce those checkpoints exactly.
    """

    def __init__(
        self,
        in_dim: int = 64,
        channels: Sequence[int] = (1024, 512, 256, 128, 64),
        tanh: bool = True,
    ):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 5:
            raise ValidationError(f"expected 5 channel counts, got {len(channels)}", key="channels")
        self.in_dim = int(in_dim)
        self.tanh = bool(tanh)
        layers: list[nn.Module] = [nn.ConvTranspose2d(self.in_dim, channels[0], 4, 1, 0), nn.ReLU(inplace=True)]
        for a, b in zip(channels[:-1], channels[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1), nn.ReLU(inplace=True)]
        # 1x1 convolution to RGB (kept as a 1x1 transposed conv: same maths, original layout)
        layers.append(nn.ConvTranspose2d(channels[-1], 3, 1, 1, 0))
        self.model = nn.Sequential(*layers)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """Generate faces.

        Parameters
        ----------
        emb : torch.Tensor, shape (B, 64) or (B, 64, 1, 1)
            Voice embeddings (L2-normalised in the Wen et al. recipe).

        Returns
        -------
        torch.Tensor, shape (B, 3, 64, 64)
            Images in [-1, 1] (with ``tanh=True``).
        """
        if emb.dim() == 2:
            emb = emb[:, :, None, None]
        if emb.dim() != 4 or emb.shape[1] != self.in_dim or emb.shape[2:] != (1, 1):
            raise ValidationError(
                f"expected (B, {self.in_dim}) or (B, {self.in_dim}, 1, 1), got {tuple(emb.shape)}", key="emb"
            )
        out = self.model(emb)
        return torch.tanh(out) if self.tanh else out


class FaceTrunk(nn.Module):
    """Wen et al. (2019) face embedding trunk shared by the discriminator and the classifier.

    Conv 3 -> 32 (1x1), then 64, 128, 256, 512 (4x4, stride 2, padding 1: 64 -> 4 pixels),
    LeakyReLU(0.2) after each, then a 4x4 valid conv 512 -> 64 (4x4 -> 1x1, no activation).

    Parameters
    ----------
    channels : sequence of int
        The five hidden widths, default (32, 64, 128, 256, 512).
    out_dim : int
        Output features (64).
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 128, 256, 512), out_dim: int = 64):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 5:
            raise ValidationError(f"expected 5 channel counts, got {len(channels)}", key="channels")
        self.out_dim = int(out_dim)
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 1, 1, 0), nn.LeakyReLU(0.2, inplace=True)]
        for a, b in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(a, b, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(channels[-1], self.out_dim, 4, 1, 0))
        self.model = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed faces.

        Parameters
        ----------
        images : torch.Tensor, shape (B, 3, 64, 64)
            Faces in [-1, 1].

        Returns
        -------
        torch.Tensor, shape (B, 64)
        """
        if images.dim() != 4 or images.shape[1:] != (3, 64, 64):
            raise ValidationError(f"expected (B, 3, 64, 64) images, got {tuple(images.shape)}", key="images")
        return self.model(images).flatten(1)


class Discriminator(nn.Module):
    """Real/fake head ``Linear(64, 1)`` on a :class:`FaceTrunk`.

    Parameters
    ----------
    trunk : FaceTrunk, optional
        Pass the same trunk to :class:`IdentityClassifier` to share it (as Wen et al. do); a new
        one when None.
    bias : bool
        Wen et al.'s heads have no bias (default False).
    """

    def __init__(self, trunk: FaceTrunk | None = None, bias: bool = False):
        super().__init__()
        self.trunk = trunk if trunk is not None else FaceTrunk()
        self.head = nn.Linear(self.trunk.out_dim, 1, bias=bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Real/fake logits.

        Parameters
        ----------
        images : torch.Tensor, shape (B, 3, 64, 64)

        Returns
        -------
        torch.Tensor, shape (B, 1)
            Logits (use ``F.binary_cross_entropy_with_logits``).
        """
        return self.head(self.trunk(images))


class IdentityClassifier(nn.Module):
    """Identity head ``Linear(64, n_ids)`` on a :class:`FaceTrunk`.

    Parameters
    ----------
    n_ids : int
        Number of training identities.
    trunk : FaceTrunk, optional
        Shared trunk; a new one when None.
    bias : bool
        Default False (as Wen et al.).
    """

    def __init__(self, n_ids: int, trunk: FaceTrunk | None = None, bias: bool = False):
        super().__init__()
        if int(n_ids) < 1:
            raise ValidationError(f"need at least one identity, got {n_ids}", key="n_ids")
        self.trunk = trunk if trunk is not None else FaceTrunk()
        self.head = nn.Linear(self.trunk.out_dim, int(n_ids), bias=bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Identity logits.

        Parameters
        ----------
        images : torch.Tensor, shape (B, 3, 64, 64)

        Returns
        -------
        torch.Tensor, shape (B, n_ids)
        """
        return self.head(self.trunk(images))


class FaceCritic(nn.Module):
    """One :class:`FaceTrunk` with both heads: real/fake ``Linear(64, 1)`` and identity
    ``Linear(64, n_ids)`` (no biases), as Wen et al. train them (shared trunk, one pass).

    Parameters
    ----------
    n_ids : int
        Number of training identities.
    channels : sequence of int
        Trunk widths (:class:`FaceTrunk`).
    """

    def __init__(self, n_ids: int, channels: Sequence[int] = (32, 64, 128, 256, 512)):
        super().__init__()
        if int(n_ids) < 1:
            raise ValidationError(f"need at least one identity, got {n_ids}", key="n_ids")
        self.trunk = FaceTrunk(channels)
        self.real_fake = nn.Linear(self.trunk.out_dim, 1, bias=False)
        self.identity = nn.Linear(self.trunk.out_dim, int(n_ids), bias=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Real/fake logits (B, 1) and identity logits (B, n_ids) of faces (B, 3, 64, 64) in [-1, 1]."""
        h = self.trunk(images)
        return self.real_fake(h), self.identity(h)


class Frozen(nn.Module):
    """A pretrained module kept fixed: no gradients, always in eval mode (``train()`` is ignored).

    Parameters
    ----------
    module : nn.Module
        Available as ``.module``; calls are forwarded to it.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.module.requires_grad_(False)
        self.module.eval()

    def train(self, mode: bool = True) -> "Frozen":
        super().train(False)
        self.module.eval()
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# Image -> 3DMM (MobileNetV2)
# --------------------------------------------------------------------------------------------


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor``, never more than 10 % below ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _conv_bn_relu6(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion (skipped when t = 1), 3x3 depthwise, linear 1x1 projection.

    A residual connection is added when the stride is 1 and the channel count is unchanged.

    Parameters
    ----------
    cin, cout : int
        Input and output channels.
    stride : int
        1 or 2 (of the depthwise conv).
    expand : int
        Expansion ratio t.
    """

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValidationError(f"stride must be 1 or 2, got {stride}", key="stride")
        hidden = int(round(cin * expand))
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_relu6(cin, hidden, kernel=1))
        layers += [
            _conv_bn_relu6(hidden, hidden, kernel=3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, cin, H, W) -> (B, cout, H / stride, W / stride)."""
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) regressing 3DDFA parameters.

    Stem 3x3 conv (32 channels, stride 2), the inverted-residual stages of
    :data:`MOBILENET_V2_SETTING`, a 1x1 conv to 1280 channels, global average pooling, dropout
    and one linear layer to ``num_outputs``. BatchNorm and ReLU6 throughout. All channel counts
    are multiplied by ``width_mult`` and rounded to multiples of 8 (the last conv is never
    narrower than 1280).

    Parameters
    ----------
    num_outputs : int
        62 = 12 pose + 40 shape + 10 expression (3DDFA layout, normalised parameters).
    width_mult : float
        Width multiplier.
    dropout : float
        Dropout before the linear layer (0.2, as the reference regressors).
    last_channels : int, optional
        Width of the last 1x1 conv (the pooled feature size); default 1280 (or more for
        ``width_mult > 1``). Smaller values make tiny networks for tests.
    early_index : int
        ``features[:early_index]`` produces the "early" feature map. The default 9 ends after
        the second block of the 64-channel stage (stride 16: 8x8 for a 120x120 input), the
        layer the Cross-Modal-Perceptionist recipe applies its second PKT term to.

    Attributes
    ----------
    features : nn.Sequential
        Stem, 17 blocks, last conv (19 modules).
    map_indices : tuple of int
        Indices into ``features`` whose outputs form ``maps``: the last layer of each resolution
        (strides 4, 8, 16 and 32, the last being the 1280-channel conv output).
    map_channels : tuple of int
        Channels of those maps (24, 32, 96, 1280 at width 1.0).
    early_channels : int
        Channels of the early map (64 at width 1.0).
    feature_dim : int
        Size of the pooled feature vector (1280 at width 1.0).
    """

    def __init__(
        self,
        num_outputs: int = 62,
        width_mult: float = 1.0,
        dropout: float = 0.2,
        early_index: int = 9,
        setting: Sequence[Sequence[int]] = MOBILENET_V2_SETTING,
        last_channels: int | None = None,
    ):
        super().__init__()
        if width_mult <= 0:
            raise ValidationError(f"width_mult must be positive, got {width_mult}", key="width_mult")
        if last_channels is not None and int(last_channels) < 1:
            raise ValidationError(f"last_channels must be positive, got {last_channels}", key="last_channels")
        cin = make_divisible(32 * width_mult)
        self.width_mult = float(width_mult)
        self.feature_dim = int(last_channels) if last_channels is not None else make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [_conv_bn_relu6(3, cin, kernel=3, stride=2)]
        channels = [cin]
        strides = [2]
        for t, c, n, s in setting:
            cout = make_divisible(c * width_mult)
            for i in range(n):
                stride = s if i == 0 else 1
                layers.append(InvertedResidual(cin, cout, stride, t))
                cin = cout
                channels.append(cout)
                strides.append(stride)
        layers.append(_conv_bn_relu6(cin, self.feature_dim, kernel=1))
        channels.append(self.feature_dim)
        strides.append(1)
        self.features = nn.Sequential(*layers)
        if not 1 <= early_index <= len(layers):
            raise ValidationError(f"early_index must lie in [1, {len(layers)}]", key="early_index")
        self.early_index = int(early_index)
        self.early_channels = channels[self.early_index - 1]
        # last layer of each resolution, from stride 4 on; the final 1x1 conv closes the last one
        ends = [i for i in range(len(layers) - 1) if strides[i + 1] == 2] + [len(layers) - 1]
        self.map_indices = tuple(i for i in ends if i >= 2)
        self.map_channels = tuple(channels[i] for i in self.map_indices)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.feature_dim, int(num_outputs))
        self.num_outputs = int(num_outputs)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Regress parameters, optionally with intermediate features.

        Parameters
        ----------
        x : torch.Tensor, shape (B, 3, H, W)
            Images (120x120 in the 3DDFA setting; any size >= 32 works).
        return_features : bool

        Returns
        -------
        torch.Tensor, shape (B, num_outputs)
            When ``return_features`` is False.
        dict
            When ``return_features`` is True, the distillation calling convention of
            :mod:`v2m_models.kd`: ``params`` (B, num_outputs), ``features`` (B, 1280) the pooled
            vector, ``early`` (B, 64, H/16, W/16) the early map and ``maps`` a list of
            (B, C_i, H_i, W_i) maps at strides 4, 8, 16, 32 (C = 24, 32, 96, 1280 at width 1).
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValidationError(f"expected (B, 3, H, W) images, got {tuple(x.shape)}", key="x")
        maps: list[torch.Tensor] = []
        early = None
        h = x
        wanted = set(self.map_indices) if return_features else set()
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in wanted:
                maps.append(h)
            if return_features and i == self.early_index - 1:
                early = h
        pooled = h.mean(dim=(2, 3))
        params = self.classifier(self.dropout(pooled))
        if not return_features:
            return params
        return {"params": params, "features": pooled, "early": early, "maps": maps}


class ImageTo3DMM(nn.Module):
    """Face image -> 3DDFA parameters, with the 62 outputs split by meaning.

    Parameters
    ----------
    backbone : MobileNetV2, optional
        Must have 62 outputs; a new width-1.0 one when None.
    input_size : int or None
        Images of another size are bilinearly resized to ``input_size`` (the 64x64 GAN faces go
        to 120x120). None: no resizing.
    align_corners : bool
        Of the bilinear resize (True, as the Cross-Modal-Perceptionist code).

    Notes
    -----
    Output layout (3DDFA): ``params[:, :12]`` pose (a 3x4 camera matrix, row-major),
    ``params[:, 12:52]`` shape, ``params[:, 52:62]`` expression; all normalised by the 3DDFA
    parameter mean and std.
    """

    POSE = slice(0, 12)
    SHAPE = slice(12, 52)
    EXPRESSION = slice(52, 62)

    def __init__(self, backbone: MobileNetV2 | None = None, input_size: int | None = 120, align_corners: bool = True):
        super().__init__()
        self.backbone = backbone if backbone is not None else MobileNetV2(num_outputs=62)
        if self.backbone.num_outputs != 62:
            raise ValidationError(f"backbone must have 62 outputs, has {self.backbone.num_outputs}", key="backbone")
        self.input_size = None if input_size is None else int(input_size)
        self.align_corners = bool(align_corners)

    def forward(self, images: torch.Tensor, return_features: bool = False) -> dict:
        """Predict parameters.

        Parameters
        ----------
        images : torch.Tensor, shape (B, 3, H, W)
        return_features : bool
            Also return ``features``, ``early`` and ``maps`` (see :meth:`MobileNetV2.forward`).

        Returns
        -------
        dict
            ``params`` (B, 62), ``pose`` (B, 12), ``shape`` (B, 40), ``expression`` (B, 10)
            and, on request, the feature entries.
        """
        if (
            self.input_size is not None
            and images.dim() == 4
            and tuple(images.shape[2:]) != (self.input_size, self.input_size)
        ):
            images = F.interpolate(
                images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=self.align_corners
            )
        out = self.backbone(images, return_features=True) if return_features else {"params": self.backbone(images)}
        p = out["params"]
        out["pose"] = p[:, self.POSE]
        out["shape"] = p[:, self.SHAPE]
        out["expression"] = p[:, self.EXPRESSION]
        return out
