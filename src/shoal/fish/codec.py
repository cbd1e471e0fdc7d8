"""The Fish Speech S1 audio codec (fish's "modded DAC", config `modded_dac_vq`) in plain torch.

44.1 kHz mono audio <-> 10 rows of integer codes at 44100 / 2048 ~ 21.5 frames per second:

    encode: audio -> causal conv encoder (512 samples per latent frame) -> 2 x (stride-2 conv + ConvNeXt)
            -> window-limited transformer -> 1 semantic VQ (4096 entries), then 9 residual VQs (1024 entries
            each) on what it leaves -> codes [10, F]
    decode: codes -> sum of the projected codebook vectors -> transformer -> 2 x (stride-2 transposed conv +
            ConvNeXt) -> causal conv decoder -> tanh -> audio [F * 2048]

Everything is causal, so a frame's codes depend only on audio up to the end of that frame, and decoding can be
incremental: `DecodeStream` pushes codes a few frames at a time through the same modules, which keep what they
need of the past (each causal convolution its last inputs, each window-limited transformer its keys and values
within the window), so every frame goes through the codec once and the audio is the one-shot decode's.

The module tree mirrors the reference's exactly: parameter names equal the keys of the released `codec.pth`, so it
loads strictly and nothing is renamed. The codec transformers' RoPE tables and causal masks follow from the config:
fish-speech 0.1.0 saved them in `codec.pth`, 2.x builds them at init and saves none, and `load_codec` takes either
file the way the checkpoint's own reference does. Numerics follow the reference operation by
operation (same op order, same float32 islands), because the golden fixtures demand identical codes and a
float32 decode that matches to rounding.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from shoal.errors import CheckpointError

# The codec's transformers use the same SwiGLU as the text model (it reads only `.dim` and `.intermediate_size`).
from .dual_ar import FeedForward

# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------

# The reference builds the encoder-block transformers with this window, whatever the yaml says.
ENCODER_TRANSFORMER_WINDOW = 512
# ...and with one head per 64 channels and a 3x FFN, also hard-coded.
ENCODER_TRANSFORMER_HEAD_WIDTH = 64
ENCODER_TRANSFORMER_FFN_RATIO = 3
# fish's DAC pads audio to `hop_length * 4` regardless of the quantizer's downsampling, so only configs whose
# downsample factors multiply to 4 behave like the reference.
REFERENCE_FRAME_MULTIPLE = 4


@dataclass(frozen=True)
class TransformerConfig:
    """One codec transformer (the inference-relevant fields of fish's `ModelArgs` + the attention window).

    `block_size` sizes the RoPE table (and the causal mask fish-speech 0.1.0 stored), so it is also the longest
    input in frames.
    `window_size` None means plain causal attention; otherwise each position sees itself and the previous
    `window_size - 1` positions.
    """

    n_layer: int
    n_head: int
    dim: int
    intermediate_size: int
    head_dim: int = 64
    block_size: int = 2048
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    window_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "dim", "intermediate_size", "head_dim", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"transformer {name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_head:
            raise ValueError(f"transformer dim {self.dim} must be divisible by n_head {self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"transformer head_dim must be even for RoPE, got {self.head_dim}")
        if self.window_size is not None and self.window_size <= 0:
            raise ValueError(f"transformer window_size must be positive or None, got {self.window_size}")


@dataclass(frozen=True)
class CodecConfig:
    """Hyper-parameters of the codec. The defaults are fish's real `modded_dac_vq.yaml`.

    Field names follow that yaml: top-level DAC arguments, `transformer_*` for its `transformer_general_config`
    (the template of the encoder-block transformers), quantizer arguments, and `quantizer_transformer` for its
    `pre_module` / `post_module` (one config: the yaml defines them with the same anchor).
    """

    sample_rate: int = 44100
    encoder_dim: int = 64
    encoder_rates: tuple[int, ...] = (2, 4, 8, 8)
    decoder_dim: int = 1536
    decoder_rates: tuple[int, ...] = (8, 8, 4, 2)
    encoder_transformer_layers: tuple[int, ...] = (0, 0, 0, 4)
    # The reference builds decoder-block transformers from this but never calls them and never registers them
    # (so codec.pth has no weights for them). Kept only so configs round-trip; it changes nothing here.
    decoder_transformer_layers: tuple[int, ...] = (4, 0, 0, 0)
    transformer_block_size: int = 16384
    transformer_head_dim: int = 64
    transformer_rope_base: float = 10000.0
    transformer_norm_eps: float = 1e-5
    quantizer_dim: int = 1024
    n_codebooks: int = 9
    codebook_size: int = 1024
    codebook_dim: int = 8
    semantic_codebook_size: int = 4096
    downsample_factor: tuple[int, ...] = (2, 2)
    quantizer_transformer: TransformerConfig = TransformerConfig(
        n_layer=8, n_head=16, dim=1024, intermediate_size=3072, head_dim=64, block_size=4096, window_size=128
    )

    def __post_init__(self) -> None:
        for name in ("encoder_rates", "decoder_rates", "encoder_transformer_layers",
                     "decoder_transformer_layers", "downsample_factor"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        # fish zips rates with layer counts, so a shorter list would silently drop blocks.
        if len(self.encoder_rates) != len(self.encoder_transformer_layers):
            raise ValueError("encoder_rates and encoder_transformer_layers must have the same length")
        if len(self.decoder_rates) != len(self.decoder_transformer_layers):
            raise ValueError("decoder_rates and decoder_transformer_layers must have the same length")
        if self.quantizer_dim != self.latent_dim:
            raise ValueError(f"quantizer input_dim {self.quantizer_dim} must equal the encoder's latent width "
                             f"encoder_dim * 2**len(encoder_rates) = {self.latent_dim}")
        if self.quantizer_transformer.dim != self.quantizer_dim:
            raise ValueError("quantizer transformers with config.dim != input_dim (input/output projections) "
                             "are not supported")
        if math.prod(self.downsample_factor) != REFERENCE_FRAME_MULTIPLE:
            raise ValueError(f"downsample_factor must multiply to {REFERENCE_FRAME_MULTIPLE} (fish hard-codes "
                             f"frame_length = 4 * hop_length), got {self.downsample_factor}")
        if math.prod(self.decoder_rates) != self.hop_length:
            raise ValueError(f"decoder_rates multiply to {math.prod(self.decoder_rates)}, "
                             f"but the encoder hop is {self.hop_length}")
        if self.decoder_dim % 2 ** len(self.decoder_rates):
            raise ValueError("decoder_dim must be divisible by 2**len(decoder_rates)")
        for i, n_layer in enumerate(self.encoder_transformer_layers):
            if n_layer < 0:
                raise ValueError(f"encoder_transformer_layers[{i}] must be >= 0")
            if n_layer and self.encoder_block_dim(i) < ENCODER_TRANSFORMER_HEAD_WIDTH:
                raise ValueError(f"encoder block {i} is {self.encoder_block_dim(i)} wide; a transformer there "
                                 f"needs at least {ENCODER_TRANSFORMER_HEAD_WIDTH} channels")
        for name in ("sample_rate", "encoder_dim", "decoder_dim", "n_codebooks", "codebook_size", "codebook_dim",
                     "semantic_codebook_size", "transformer_block_size", "transformer_head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    # -- derived sizes ----------------------------------------------------------------------------------------

    @property
    def hop_length(self) -> int:
        """Audio samples per encoder frame (512)."""
        return math.prod(self.encoder_rates)

    @property
    def frame_length(self) -> int:
        """Audio samples per code frame (2048): the encoder hop times the quantizer's downsampling."""
        return self.hop_length * math.prod(self.downsample_factor)

    @property
    def num_codebooks(self) -> int:
        """Rows of a code frame: 1 semantic + n_codebooks residual (10)."""
        return 1 + self.n_codebooks

    @property
    def latent_dim(self) -> int:
        """Channels of the encoder output / quantizer input."""
        return self.encoder_dim * 2 ** len(self.encoder_rates)

    def encoder_block_dim(self, i: int) -> int:
        """Output channels of encoder block i (the encoder doubles the width at every block)."""
        return self.encoder_dim * 2 ** (i + 1)

    def encoder_transformer(self, i: int) -> TransformerConfig:
        """The transformer fish appends to encoder block i (only used when encoder_transformer_layers[i] > 0)."""
        dim = self.encoder_block_dim(i)
        return TransformerConfig(
            n_layer=self.encoder_transformer_layers[i],
            n_head=dim // ENCODER_TRANSFORMER_HEAD_WIDTH,
            dim=dim,
            intermediate_size=dim * ENCODER_TRANSFORMER_FFN_RATIO,
            head_dim=self.transformer_head_dim,
            block_size=self.transformer_block_size,
            rope_base=self.transformer_rope_base,
            norm_eps=self.transformer_norm_eps,
            window_size=ENCODER_TRANSFORMER_WINDOW,
        )

    # -- (de)serialisation in fish's hydra-yaml layout --------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | Path) -> CodecConfig:
        """Read a fish-style hydra yaml (like `modded_dac_vq.yaml`); `&`/`*` anchors resolve in pyyaml."""
        import yaml  # only needed here

        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CodecConfig:
        """Parse fish's hydra layout (what `to_dict` writes, or a yaml's contents).

        Missing keys take the defaults of the reference classes (DAC, ModelArgs, ...), exactly as hydra would;
        note these are not always the real yaml's values (e.g. ModelArgs.block_size is 2048). `_target_` may
        name only the expected class, `_partial_` is ignored, training-only keys (dropout rates) are accepted
        and dropped, and anything else unknown or unsupported raises ValueError.
        """
        return _parse_dac(data)

    def to_dict(self) -> dict[str, Any]:
        """fish's hydra layout with every inference-relevant value spelled out (no `_target_`s)."""
        qt = self.quantizer_transformer
        module = {
            "causal": True,
            "window_size": qt.window_size,
            "input_dim": self.quantizer_dim,
            "config": {
                "block_size": qt.block_size, "n_layer": qt.n_layer, "n_head": qt.n_head, "dim": qt.dim,
                "intermediate_size": qt.intermediate_size, "n_local_heads": -1, "head_dim": qt.head_dim,
                "rope_base": qt.rope_base, "norm_eps": qt.norm_eps, "channels_first": True,
            },
        }
        return {
            "sample_rate": self.sample_rate,
            "encoder_dim": self.encoder_dim,
            "encoder_rates": list(self.encoder_rates),
            "decoder_dim": self.decoder_dim,
            "decoder_rates": list(self.decoder_rates),
            "encoder_transformer_layers": list(self.encoder_transformer_layers),
            "decoder_transformer_layers": list(self.decoder_transformer_layers),
            "causal": True,
            "transformer_general_config": {
                "block_size": self.transformer_block_size, "n_local_heads": -1,
                "head_dim": self.transformer_head_dim, "rope_base": self.transformer_rope_base,
                "norm_eps": self.transformer_norm_eps, "channels_first": True,
            },
            "quantizer": {
                "input_dim": self.quantizer_dim,
                "n_codebooks": self.n_codebooks,
                "codebook_size": self.codebook_size,
                "codebook_dim": self.codebook_dim,
                "downsample_factor": list(self.downsample_factor),
                "semantic_codebook_size": self.semantic_codebook_size,
                "pre_module": module,
                "post_module": {**module, "config": dict(module["config"])},
            },
        }


# Keys that only matter for training; the reference ignores them at inference, so do we.
_TRAINING_ONLY = frozenset({"dropout_rate", "attn_dropout_rate", "quantizer_dropout"})


class _Section:
    """One mapping of the yaml being parsed: typed getters that record what was read, plus a strict finish()."""

    def __init__(self, data: Any, where: str, target: str) -> None:
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
        self.data, self.where, self.seen = data, where, {"_partial_"} | _TRAINING_ONLY
        if "_target_" in data and str(data["_target_"]).rsplit(".", 1)[-1] != target:
            raise ValueError(f"{where}._target_ is {data['_target_']!r}; only fish's {target} is supported")
        self.seen.add("_target_")

    def _raw(self, key: str, default: Any) -> Any:
        self.seen.add(key)
        return self.data.get(key, default)

    def get_int(self, key: str, default: int) -> int:
        value = self._raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{self.where}.{key} must be an integer, got {value!r}")
        return value

    def get_float(self, key: str, default: float) -> float:
        value = self._raw(key, default)
        if isinstance(value, bool):
            raise ValueError(f"{self.where}.{key} must be a number, got {value!r}")
        try:  # pyyaml reads `1e-5` (no dot) as a string; omegaconf, which fish uses, reads it as a float
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{self.where}.{key} must be a number, got {value!r}") from None

    def get_ints(self, key: str, default: tuple[int, ...]) -> tuple[int, ...]:
        value = self._raw(key, default)
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{self.where}.{key} must be a list of integers, got {value!r}")
        return tuple(value)

    def require(self, key: str, expected: Any, default: Any, why: str) -> None:
        value = self._raw(key, default)
        if value != expected:
            raise ValueError(f"{self.where}.{key} = {value!r} is not supported ({why})")

    def reject(self, key: str, why: str) -> None:
        if key in self.data:
            raise ValueError(f"{self.where}.{key} is not supported ({why})")
        self.seen.add(key)

    def section(self, key: str, target: str) -> _Section:
        self.seen.add(key)
        if key not in self.data or self.data[key] is None:
            raise ValueError(f"{self.where}.{key} is required")
        return _Section(self.data[key], f"{self.where}.{key}", target)

    def finish(self) -> None:
        unknown = sorted(str(k) for k in self.data if k not in self.seen)
        if unknown:
            raise ValueError(f"unknown keys in {self.where}: {', '.join(unknown)}")


def _parse_model_args(s: _Section, *, per_block: bool) -> dict[str, Any]:
    """ModelArgs fields. For the encoder template (`per_block`) fish overrides the sizes itself, so they are
    rejected rather than silently overridden."""
    out: dict[str, Any] = {
        "block_size": s.get_int("block_size", 2048),
        "head_dim": s.get_int("head_dim", 64),
        "rope_base": s.get_float("rope_base", 10000.0),
        "norm_eps": s.get_float("norm_eps", 1e-5),
    }
    if per_block:
        for key in ("n_layer", "n_head", "dim", "intermediate_size"):
            s.reject(key, "fish sets it per encoder block")
        n_head = -1
    else:
        n_head = s.get_int("n_head", 8)
        out.update(n_layer=s.get_int("n_layer", 8), n_head=n_head, dim=s.get_int("dim", 512),
                   intermediate_size=s.get_int("intermediate_size", 1536))
    local = s._raw("n_local_heads", -1)
    if local not in (-1, n_head):  # fish's attention splits q/k/v into equal thirds: no grouped-query attention
        raise ValueError(f"{s.where}.n_local_heads = {local!r} is not supported (only -1, i.e. n_head)")
    s.require("channels_first", True, True, "the codec's transformers take [B, C, T]")
    s.require("pos_embed_type", "rope", "rope", "only RoPE is implemented")
    s.reject("max_relative_position", "only used by the conformer position embedding")
    s.finish()
    return out


def _parse_window_transformer(s: _Section, input_dim: int) -> TransformerConfig:
    s.require("causal", True, True, "fish implements only the causal window-limited transformer")
    s.require("input_dim", input_dim, 512, "must equal the quantizer's input_dim")
    window = s._raw("window_size", None)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
        raise ValueError(f"{s.where}.window_size must be an integer or null, got {window!r}")
    s.reject("look_ahead_conv", "not used by modded_dac_vq")
    args = _parse_model_args(s.section("config", "ModelArgs"), per_block=False)
    s.finish()
    return TransformerConfig(window_size=window, **args)


def _parse_dac(data: Mapping[str, Any]) -> CodecConfig:
    top = _Section(data, "codec", "DAC")
    kwargs: dict[str, Any] = {
        "sample_rate": top.get_int("sample_rate", 44100),
        "encoder_dim": top.get_int("encoder_dim", 64),
        "encoder_rates": top.get_ints("encoder_rates", (2, 4, 8, 8)),
        "decoder_dim": top.get_int("decoder_dim", 1536),
        "decoder_rates": top.get_ints("decoder_rates", (8, 8, 4, 2)),
        "encoder_transformer_layers": top.get_ints("encoder_transformer_layers", (0, 0, 0, 0)),
        "decoder_transformer_layers": top.get_ints("decoder_transformer_layers", (0, 0, 0, 0)),
    }
    top.require("causal", True, True, "only the causal DAC is implemented")
    top.reject("latent_dim", "the latent width is always encoder_dim * 2**len(encoder_rates)")
    if top.data.get("transformer_general_config") is not None:
        general = _parse_model_args(top.section("transformer_general_config", "ModelArgs"), per_block=True)
    else:  # never called by fish when no encoder block has a transformer
        top.seen.add("transformer_general_config")
        general = {"block_size": 2048, "head_dim": 64, "rope_base": 10000.0, "norm_eps": 1e-5}
        if any(kwargs["encoder_transformer_layers"]):
            raise ValueError("codec.transformer_general_config is required when encoder_transformer_layers > 0")
    kwargs.update({f"transformer_{k}": v for k, v in general.items()})

    q = top.section("quantizer", "DownsampleResidualVectorQuantize")
    input_dim = q.get_int("input_dim", 1024)
    pre = _parse_window_transformer(q.section("pre_module", "WindowLimitedTransformer"), input_dim)
    post = _parse_window_transformer(q.section("post_module", "WindowLimitedTransformer"), input_dim)
    if pre != post:
        raise ValueError("codec.quantizer: pre_module and post_module must have the same configuration")
    kwargs.update(
        quantizer_dim=input_dim,
        n_codebooks=q.get_int("n_codebooks", 9),
        codebook_size=q.get_int("codebook_size", 1024),
        codebook_dim=q.get_int("codebook_dim", 8),
        semantic_codebook_size=q.get_int("semantic_codebook_size", 4096),
        downsample_factor=q.get_ints("downsample_factor", (2, 2)),
        quantizer_transformer=pre,
    )
    q.require("downsample_dims", None, None, "the quantizer keeps input_dim channels while downsampling")
    q.reject("semantic_predictor_module", "a training-only module")
    q.finish()
    top.finish()
    return CodecConfig(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Incremental decoding: what each stateful module keeps between pushes
# ----------------------------------------------------------------------------------------------------------------

#: The stream being decoded in this thread (or context), if any: modules read and write their state in it.
_STREAM: ContextVar["dict[Any, Any] | None"] = ContextVar("codec_stream", default=None)


def _with_past(key: Any, x: Tensor, keep: int, initial: Tensor | None, dim: int = -1) -> Tensor:
    """`x` preceded along `dim` (time) by what was kept under `key` from earlier pushes (`initial` the first
    time, nothing if None); keeps the last `keep` frames of the result for the next push."""
    state = _STREAM.get()
    past = state.get(key, initial)
    full = x if past is None else torch.cat([past, x], dim=dim)
    length = full.shape[dim]
    state[key] = full.narrow(dim, max(0, length - keep), min(keep, length))
    return full


# ----------------------------------------------------------------------------------------------------------------
# Convolutions (causal; two weight-norm spellings)
# ----------------------------------------------------------------------------------------------------------------


class CausalConv1d(nn.Module):
    """Conv1d that pads (dilated kernel - stride) on the left and up to a whole stride on the right.

    So the output has ceil(T / stride) frames and frame t never sees input after (t + 1) * stride. The weight
    norm uses torch parametrizations because that is what gives fish's `conv.parametrizations.weight.original0
    (g) / original1 (v)` keys and its exact `torch._weight_norm` math; the quantizer's down-sampling convs have
    no weight norm (plain `conv.weight`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, weight_normed: bool = True) -> None:
        super().__init__()
        conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation, groups=groups)
        self.conv = weight_norm(conv) if weight_normed else conv
        self.stride = stride
        self.left_pad = (kernel_size - 1) * dilation + 1 - stride

    def forward(self, x: Tensor) -> Tensor:
        if _STREAM.get() is not None and self.stride == 1:  # incremental: the left padding is the past input
            zeros = x.new_zeros(*x.shape[:-1], self.left_pad)
            return self.conv(_with_past(self, x, self.left_pad, zeros))
        right_pad = -x.shape[-1] % self.stride
        return self.conv(F.pad(x, (self.left_pad, right_pad)))


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d whose output is cut to exactly T * stride samples by dropping (kernel - stride) on the
    right, the samples that would depend on future input. g of its weight norm is per *input* channel (dim 0
    of a transposed-conv weight)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 weight_normed: bool = True) -> None:
        super().__init__()
        conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride)
        self.conv = weight_norm(conv) if weight_normed else conv
        self.trim = kernel_size - stride
        self.stride = stride
        #: Input frames whose output overlaps a later frame's: what an incremental decode must keep.
        self.overlap = -(-self.trim // stride)

    def forward(self, x: Tensor) -> Tensor:
        if _STREAM.get() is not None and self.overlap:
            n = x.shape[-1]
            y = self.conv(_with_past(self, x, self.overlap, None))
            return y[..., y.shape[-1] - self.trim - n * self.stride : y.shape[-1] - self.trim]
        y = self.conv(x)
        return y[..., : y.shape[-1] - self.trim]


class LegacyWeightNormConv1d(nn.Module):
    """1x1 Conv1d with the *legacy* weight-norm spelling (`weight_g`, `weight_v`) of the VQ projections.

    descript-audio-codec wraps these with the old `torch.nn.utils.weight_norm`; both spellings compute
    `torch._weight_norm(v, g, 0)` = g * v / ||v|| (norm over all dims but 0), so we call it directly instead of
    relying on the deprecated hook.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        init = nn.Conv1d(in_channels, out_channels, 1)  # torch's usual init, only so an unloaded module is sane
        self.bias = nn.Parameter(init.bias.detach())
        self.weight_g = nn.Parameter(torch.linalg.vector_norm(init.weight.detach(), dim=(1, 2), keepdim=True))
        self.weight_v = nn.Parameter(init.weight.detach())

    def forward(self, x: Tensor) -> Tensor:
        return F.conv1d(x, torch._weight_norm(self.weight_v, self.weight_g, 0), self.bias)


class Snake(nn.Module):
    """x + sin(alpha x)^2 / (alpha + 1e-9), one alpha per channel.

    Written as reciprocal-times-square like descript-audio-codec's scripted kernel, to round identically.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class ResidualUnit(nn.Module):
    """x + conv1x1(snake(conv7_dilated(snake(x)))). Causal padding keeps the length, so no cropping."""

    def __init__(self, dim: int, dilation: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            Snake(dim),
            CausalConv1d(dim, dim, kernel_size=7, dilation=dilation),
            Snake(dim),
            CausalConv1d(dim, dim, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


def _residual_stack(dim: int) -> list[nn.Module]:
    return [ResidualUnit(dim, dilation) for dilation in (1, 3, 9)]


class EncoderBlock(nn.Module):
    """Three residual units at dim/2 channels, then a strided conv that doubles channels and divides time by
    `stride`, optionally followed by a window-limited transformer."""

    def __init__(self, dim: int, stride: int, transformer: TransformerConfig | None) -> None:
        super().__init__()
        layers = [*_residual_stack(dim // 2), Snake(dim // 2),
                  CausalConv1d(dim // 2, dim, kernel_size=2 * stride, stride=stride)]
        if transformer is not None:
            layers.append(WindowLimitedTransformer(transformer))
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class Encoder(nn.Module):
    """[B, 1, T] audio -> [B, latent_dim, T / hop_length] latents."""

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = [CausalConv1d(1, config.encoder_dim, kernel_size=7)]
        for i, (stride, n_layer) in enumerate(zip(config.encoder_rates, config.encoder_transformer_layers)):
            transformer = config.encoder_transformer(i) if n_layer else None
            layers.append(EncoderBlock(config.encoder_block_dim(i), stride, transformer))
        width = config.encoder_block_dim(len(config.encoder_rates) - 1)
        layers += [Snake(width), CausalConv1d(width, config.latent_dim, kernel_size=3)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class DecoderBlock(nn.Module):
    """Snake, transposed conv (x stride in time, channels halved), three residual units."""

    def __init__(self, in_dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            Snake(in_dim),
            CausalConvTranspose1d(in_dim, out_dim, kernel_size=2 * stride, stride=stride),
            *_residual_stack(out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class Decoder(nn.Module):
    """[B, latent_dim, F'] -> [B, 1, F' * hop_length] audio in (-1, 1)."""

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        width = config.decoder_dim
        layers: list[nn.Module] = [CausalConv1d(config.latent_dim, width, kernel_size=7)]
        for stride in config.decoder_rates:
            layers.append(DecoderBlock(width, width // 2, stride))
            width //= 2
        layers += [Snake(width), CausalConv1d(width, 1, kernel_size=7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


# ----------------------------------------------------------------------------------------------------------------
# Window-limited transformer
# ----------------------------------------------------------------------------------------------------------------


def rope_table(seq_len: int, head_dim: int, base: float) -> Tensor:
    """cos/sin table [seq_len, head_dim // 2, 2], computed in float32 and rounded to bfloat16.

    fish stores the codec's tables as bf16 buffers (they are in codec.pth) and rotates with those rounded
    values, so parity needs the same rounding.
    """
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=freqs.device), freqs)
    cis = torch.polar(torch.ones_like(angles), angles)
    return torch.stack([cis.real, cis.imag], dim=-1).to(torch.bfloat16)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) of x [B, T, H, D] by rope [T, D/2, 2]; float32 math."""
    xp = x.float().reshape(*x.shape[:-1], -1, 2)
    rope = rope.view(1, xp.shape[1], 1, xp.shape[3], 2)
    out = torch.stack([xp[..., 0] * rope[..., 0] - xp[..., 1] * rope[..., 1],
                       xp[..., 1] * rope[..., 0] + xp[..., 0] * rope[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


def window_mask(length: int, window: int | None, device: torch.device) -> Tensor:
    """Boolean [1, 1, T, T]: query i may attend to keys i - window + 1 .. i (all earlier keys if window None)."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    mask = j <= i
    if window is not None:
        mask &= j > i - window
    return mask[None, None]


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, the normalisation in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerScale(nn.Module):
    """Per-channel gain on a residual branch."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-2))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and RoPE on q and k (no GQA, no qk-norm)."""

    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = c.n_head, c.head_dim
        self.wqkv = nn.Linear(c.dim, 3 * c.n_head * c.head_dim, bias=False)
        self.wo = nn.Linear(c.n_head * c.head_dim, c.dim, bias=False)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, keep: int = 0) -> Tensor:
        """`keep` > 0 (incremental decoding): attend over the keys and values kept from earlier pushes too
        (`mask` covers them), and keep the last `keep` of them."""
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).view(b, t, 3, self.n_head, self.head_dim).unbind(2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if keep:  # [B, T, H, D]: time is dim 1
            k = _with_past((self, "k"), k, keep, None, dim=1)
            v = _with_past((self, "v"), v, keep, None, dim=1)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))


class TransformerBlock(nn.Module):
    """Pre-norm block with LayerScale on both residual branches."""

    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.attention = Attention(c)
        self.feed_forward = FeedForward(c)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps)
        self.attention_norm = RMSNorm(c.dim, c.norm_eps)
        self.attention_layer_scale = LayerScale(c.dim)
        self.ffn_layer_scale = LayerScale(c.dim)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, keep: int = 0) -> Tensor:
        h = x + self.attention_layer_scale(self.attention(self.attention_norm(x), rope, mask, keep))
        return h + self.ffn_layer_scale(self.feed_forward(self.ffn_norm(h)))


class WindowLimitedTransformer(nn.Module):
    """Causal transformer over [B, C, T] with attention limited to a window of past frames, final RMSNorm.

    `freqs_cis`, the bf16 RoPE table that rotates q/k, follows from the config, so it is a buffer outside the
    state_dict, built here as the reference builds it; `load_codec` puts the file's own table in its place where
    the reference reads it (fish-speech 0.1.0). fish's `causal_mask` is never read (the window mask is built per
    call, in the reference too), so none is kept.
    """

    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.config = c
        self.layers = nn.ModuleList(TransformerBlock(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.register_buffer("freqs_cis", rope_table(c.block_size, c.head_dim, c.rope_base), persistent=False)

    def derived_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shapes fish-speech 0.1.0 stored this transformer's derived buffers with (its `block_size`)."""
        c = self.config
        return {"freqs_cis": (c.block_size, c.head_dim // 2, 2), "causal_mask": (c.block_size, c.block_size)}

    def reset_rope(self) -> None:
        """Compute the RoPE table on the CPU (where the reference builds it), e.g. after a build on the meta device."""
        c = self.config
        with torch.device("cpu"):
            self.freqs_cis = rope_table(c.block_size, c.head_dim, c.rope_base)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[-1]
        state = _STREAM.get()
        start = 0 if state is None else state.get(self, 0)  # absolute position of x's first frame
        if start + t > self.config.block_size:
            raise ValueError(f"input of {start + t} frames exceeds this codec transformer's block_size "
                             f"{self.config.block_size}; encode/decode shorter pieces")
        x = x.transpose(1, 2)
        rope = self.freqs_cis[start : start + t]
        keep = 0
        if state is None:
            mask = window_mask(t, self.config.window_size, x.device)
        else:  # incremental: the queries see the keys kept from earlier pushes, within the window
            state[self] = start + t
            keep = min(self.config.window_size or self.config.block_size, self.config.block_size) - 1
            mask = window_mask(start + t, self.config.window_size, x.device)[..., start:, max(0, start - keep):]
        for layer in self.layers:
            x = layer(x, rope, mask, keep)
        return self.norm(x).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------
# Quantizer
# ----------------------------------------------------------------------------------------------------------------


class ConvNeXtBlock(nn.Module):
    """x + gamma * Linear(GELU(Linear(LayerNorm(causal depthwise conv7(x))))), exact (erf) GELU."""

    def __init__(self, dim: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.dwconv = CausalConv1d(dim, dim, kernel_size=7, groups=dim, weight_normed=False)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(mlp_ratio * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(self.dwconv(x).transpose(1, 2))
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(y)))
        return x + y.transpose(1, 2)


class VectorQuantizer(nn.Module):
    """Factorised, L2-normalised VQ: project to codebook_dim, pick the nearest entry by euclidean distance
    between the *normalised* latent and codebook rows, then project the *un-normalised* entry back."""

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.in_proj = LegacyWeightNormConv1d(dim, codebook_dim)
        self.out_proj = LegacyWeightNormConv1d(codebook_dim, dim)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z [B, dim, T] -> (codes [B, T], the quantised vector projected back [B, dim, T])."""
        z_e = self.in_proj(z)
        b, d, t = z_e.shape
        # The distance decides codes, so it runs in float32 whatever the module dtype; the formula (with its
        # constant |e|^2 term) is the reference's, to make near-ties break the same way.
        e = F.normalize(z_e.float().transpose(1, 2).reshape(b * t, d))
        c = F.normalize(self.codebook.weight.float())
        dist = e.pow(2).sum(1, keepdim=True) - 2 * e @ c.t() + c.pow(2).sum(1, keepdim=True).t()
        codes = (-dist).max(1).indices.view(b, t)
        z_q = self.lookup(codes)
        # The reference's straight-through estimator, z_e + (z_q - z_e): a no-op mathematically but not in
        # float rounding, and the residual the next codebook sees depends on it.
        z_q = z_e + (z_q - z_e)
        return codes, self.out_proj(z_q)

    def lookup(self, codes: Tensor) -> Tensor:
        """codes [B, T] -> un-normalised codebook vectors [B, codebook_dim, T]."""
        return F.embedding(codes, self.codebook.weight).transpose(1, 2)

    def decode(self, codes: Tensor) -> Tensor:
        return self.out_proj(self.lookup(codes))


class ResidualVQ(nn.Module):
    """Each quantizer encodes what the previous ones left over; decoding sums their outputs in order."""

    def __init__(self, dim: int, n_codebooks: int, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.quantizers = nn.ModuleList(
            VectorQuantizer(dim, codebook_size, codebook_dim) for _ in range(n_codebooks))

    def encode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z [B, dim, T] -> (codes [B, n, T], sum of the quantised outputs [B, dim, T])."""
        residual, total, codes = z, torch.zeros_like(z), []
        for quantizer in self.quantizers:
            c, z_q = quantizer.quantize(residual)
            total = total + z_q
            residual = residual - z_q
            codes.append(c)
        return torch.stack(codes, dim=1), total

    def decode(self, codes: Tensor) -> Tensor:
        out = self.quantizers[0].decode(codes[:, 0])
        for i in range(1, len(self.quantizers)):
            out = out + self.quantizers[i].decode(codes[:, i])
        return out


class DownsampleRVQ(nn.Module):
    """fish's DownsampleResidualVectorQuantize: 4x temporal downsampling (strided conv + ConvNeXt, twice),
    transformer, a semantic codebook, residual codebooks on what the semantic one leaves, and the mirror image
    (transformer, 2 x transposed conv + ConvNeXt) on the way back."""

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        dim = config.quantizer_dim
        self.semantic_quantizer = ResidualVQ(dim, 1, config.semantic_codebook_size, config.codebook_dim)
        self.quantizer = ResidualVQ(dim, config.n_codebooks, config.codebook_size, config.codebook_dim)
        self.downsample = nn.Sequential(*(
            nn.Sequential(CausalConv1d(dim, dim, kernel_size=f, stride=f, weight_normed=False), ConvNeXtBlock(dim))
            for f in config.downsample_factor))
        self.upsample = nn.Sequential(*(
            nn.Sequential(CausalConvTranspose1d(dim, dim, kernel_size=f, stride=f, weight_normed=False),
                          ConvNeXtBlock(dim))
            for f in reversed(config.downsample_factor)))
        self.pre_module = WindowLimitedTransformer(config.quantizer_transformer)
        self.post_module = WindowLimitedTransformer(config.quantizer_transformer)

    def encode(self, z: Tensor) -> Tensor:
        """Encoder latents [B, dim, T'] -> codes [B, 1 + n_codebooks, T' / 4]."""
        z = self.pre_module(self.downsample(z))
        semantic_codes, semantic_z = self.semantic_quantizer.encode(z)
        residual_codes, _ = self.quantizer.encode(z - semantic_z)
        return torch.cat([semantic_codes, residual_codes], dim=1)

    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, 1 + n_codebooks, F] -> latents [B, dim, 4F] for the decoder.

        Codes above a codebook's range are clamped to its last entry, as the reference does (the LM can emit
        semantic ids up to 4095 while residual books hold 1024).
        """
        semantic = codes[:, :1].clamp(max=self.semantic_quantizer.codebook_size - 1)
        residual = codes[:, 1:].clamp(max=self.quantizer.codebook_size - 1)
        z = self.semantic_quantizer.decode(semantic) + self.quantizer.decode(residual)
        return self.upsample(self.post_module(z))


# ----------------------------------------------------------------------------------------------------------------
# The codec
# ----------------------------------------------------------------------------------------------------------------


class Codec(nn.Module):
    """Audio <-> codes. Build it on the meta device and `load_codec` the weights, or use `load_codec` directly.

    Its state_dict keys are the reference's (`encoder.*`, `quantizer.*`, `decoder.*`): the weights, without the
    derived buffers. `tables` says where `load_codec` took the RoPE tables from: "stored" (the file's),
    "derived" (the file has none) or "ignored" (the file has them, and its reference never reads them).
    """

    def __init__(self, config: CodecConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or CodecConfig()
        self.encoder = Encoder(config)
        self.quantizer = DownsampleRVQ(config)
        self.decoder = Decoder(config)
        self.tables = "derived"

    def transformers(self) -> dict[str, WindowLimitedTransformer]:
        """The codec's window-limited transformers, by module path."""
        return {name: m for name, m in self.named_modules() if isinstance(m, WindowLimitedTransformer)}

    def layout(self) -> str:
        """One line on the layout of the file it was loaded from: where the RoPE tables came from, block sizes."""
        where = {"stored": "stored in codec.pth (the fish-speech 0.1.0 layout)",
                 "derived": "derived from the config (the fish-speech 2.x layout: not in codec.pth)",
                 "ignored": "derived from the config (codec.pth stores them; fish-speech 2.x never reads them)"}
        c = self.config
        return (f"RoPE tables {where[self.tables]}; block sizes {c.transformer_block_size} (encoder/decoder), "
                f"{c.quantizer_transformer.block_size} (quantizer)")

    @property
    def device(self) -> torch.device:
        return self.quantizer.quantizer.quantizers[0].codebook.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.quantizer.quantizer.quantizers[0].codebook.weight.dtype

    @torch.inference_mode()
    def encode(self, audio: Tensor) -> Tensor:
        """Mono float audio at `config.sample_rate`, [B, T] or [T] -> int64 codes [B, 10, F] or [10, F].

        The audio is right-padded with zeros to F = ceil(T / frame_length) frames. Rows of a batch share T;
        because the codec is causal, zero-padding a shorter clip to T leaves its first frames' codes unchanged.
        """
        squeeze = audio.ndim == 1
        x = audio[None] if squeeze else audio
        if x.ndim != 2 or x.shape[-1] == 0:
            raise ValueError(f"expected audio [T] or [B, T] with T > 0, got shape {tuple(audio.shape)}")
        x = x.to(device=self.device, dtype=self.dtype)
        x = F.pad(x, (0, -x.shape[-1] % self.config.frame_length))[:, None]
        codes = self.quantizer.encode(self.encoder(x))
        return codes[0] if squeeze else codes

    @torch.inference_mode()
    def decode(self, codes: Tensor) -> Tensor:
        """Integer codes [B, 10, F] or [10, F] -> float32 audio [B, F * frame_length] or [F * frame_length].

        Rows 0 / 1.. are clamped to the semantic / residual codebook sizes (reference behaviour); negative codes
        are an error.
        """
        squeeze = codes.ndim == 2
        audio = self.decoder(self.quantizer.decode(self._checked_codes(codes)))[:, 0].float()
        return audio[0] if squeeze else audio

    def _checked_codes(self, codes: Tensor) -> Tensor:
        """codes [10, F] or [B, 10, F] as int64 [B, 10, F] on the codec's device, or ValueError."""
        c = codes[None] if codes.ndim == 2 else codes
        if c.ndim != 3 or c.shape[1] != self.config.num_codebooks or c.shape[-1] == 0:
            raise ValueError(f"expected codes [{self.config.num_codebooks}, F] or [B, "
                             f"{self.config.num_codebooks}, F] with F > 0, got shape {tuple(codes.shape)}")
        if c.is_floating_point() or c.is_complex():
            raise ValueError(f"codes must be integers, got {c.dtype}")
        c = c.to(device=self.device, dtype=torch.long)
        if bool((c < 0).any()):
            raise ValueError("codes must be non-negative")
        return c

    def stream(self) -> "DecodeStream":
        """An incremental decoder for one stream of codes (see DecodeStream)."""
        return DecodeStream(self)


class DecodeStream:
    """Decodes one stream of codes a few frames at a time, each frame through the codec once.

    `push(codes)` returns the audio of just those frames (`F * frame_length` samples): the concatenation of the
    pushes is the one-shot `Codec.decode` of all the codes, to float rounding (the sums are split differently).
    The modules keep their past in this object, so streams are independent and may run in several threads. At
    most `limit` frames in all (the codec transformers' block size).
    """

    def __init__(self, codec: Codec):
        self.codec = codec
        self.state: dict[nn.Module, Any] = {}
        self.frames = 0
        self.limit = codec.config.quantizer_transformer.block_size

    @torch.inference_mode()
    def push(self, codes: Tensor) -> Tensor:
        """codes [10, F] (F >= 1) -> float32 audio [F * frame_length] continuing the stream."""
        c = self.codec._checked_codes(codes)
        if self.frames + c.shape[-1] > self.limit:
            raise ValueError(f"a decode stream takes at most {self.limit} frames; start a new one")
        token = _STREAM.set(self.state)
        try:
            audio = self.codec.decoder(self.codec.quantizer.decode(c))[0, 0].float()
        finally:
            _STREAM.reset(token)
        self.frames += c.shape[-1]
        return audio


def push_streams(streams: "list[DecodeStream]", codes: list[Tensor]) -> list[Tensor]:
    """Push one chunk into each of several streams in one batched codec call, where their shapes allow: every
    stream has decoded the same number of frames and every chunk has the same length (else ValueError). Returns
    each stream's audio, as its own `push` would (to float rounding: the batch changes how sums are split)."""
    if len(streams) == 1:
        return [streams[0].push(codes[0])]
    codec = streams[0].codec
    frames, length = streams[0].frames, codes[0].shape[-1]
    if any(s.frames != frames or s.codec is not codec for s in streams) or any(c.shape[-1] != length for c in codes):
        raise ValueError("streams batched together must be at the same frame and push chunks of the same length")
    if frames + length > streams[0].limit:
        raise ValueError(f"a decode stream takes at most {streams[0].limit} frames; start a new one")
    merged: dict[Any, Any] = {}
    for key, value in streams[0].state.items():  # same pushes so far, so the same keys and shapes
        merged[key] = torch.cat([s.state[key] for s in streams]) if isinstance(value, Tensor) else value
    token = _STREAM.set(merged)
    try:
        with torch.inference_mode():
            batch = torch.stack([codec._checked_codes(c)[0] for c in codes])
            audio = codec.decoder(codec.quantizer.decode(batch))[:, 0].float()
    finally:
        _STREAM.reset(token)
    for i, stream in enumerate(streams):
        stream.state = {k: (v[i : i + 1] if isinstance(v, Tensor) else v) for k, v in merged.items()}
        stream.frames += length
    return list(audio.unbind(0))


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------

#: fish-speech 2.0.0's modded_dac_vq.yaml halves 0.1.0's block sizes (the codec is otherwise the same).
FISH2_BLOCK_SIZES = {"transformer_block_size": 8192, "quantizer_block_size": 2048}


def reference_codec_config(kind: str = "s1") -> CodecConfig:
    """The codec a checkpoint without `codec_config.yaml` gets: its reference's `modded_dac_vq.yaml`, fish-speech
    0.1.0's for S1 (`CodecConfig()`), 2.0.0's for S2 (`FISH2_BLOCK_SIZES`)."""
    config = CodecConfig()
    if kind != "s2":
        return config
    quantizer = replace(config.quantizer_transformer, block_size=FISH2_BLOCK_SIZES["quantizer_block_size"])
    return replace(config, transformer_block_size=FISH2_BLOCK_SIZES["transformer_block_size"],
                   quantizer_transformer=quantizer)


def unwrap_codec_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """Undo the two wrappings fish's own codec loader accepts (models/dac/inference.py), in the same way:

    - a Lightning checkpoint: the weights under "state_dict";
    - a GAN training checkpoint: if any key contains "generator", keep only keys containing "generator." and
      delete that substring (the discriminator etc. are dropped).
    """
    if "state_dict" in state:
        state = state["state_dict"]
    if any("generator" in k for k in state):
        state = {k.replace("generator.", ""): v for k, v in state.items() if "generator." in k}
    return dict(state)


#: The codec transformers' buffers that follow from the config: fish-speech 0.1.0 saved them, 2.x does not.
DERIVED_BUFFERS = ("freqs_cis", "causal_mask")


def check_codec_state_dict(model: Codec, state: Mapping[str, Tensor], kind: str = "s1") -> None:
    """Raise CheckpointError naming the first missing / unexpected keys and shape mismatches, if any. The derived
    buffers may be absent; for S1 one that is present must have fish-speech 0.1.0's shape (its `load_state_dict`
    refuses any other), for S2 anything stored under their names is left alone (2.0.0 never reads it)."""
    from .checkpoint import state_dict_mismatch

    expected = dict(model.state_dict())
    for owner, transformer in model.transformers().items():
        for name, shape in transformer.derived_shapes().items():
            key = f"{owner}.{name}"
            if key in state:
                expected[key] = state[key] if kind == "s2" else torch.empty(shape, device="meta")
    problems = state_dict_mismatch(expected, state)
    if problems:
        raise CheckpointError(f"codec weights do not match the codec config ({problems})")


def split_derived_buffers(model: Codec, state: Mapping[str, Tensor],
                          kind: str = "s1") -> tuple[dict[str, Tensor], dict[str, Tensor], bool]:
    """(weights, tables, stored): the file's state (checked by `check_codec_state_dict`) without the derived
    buffers, the RoPE tables to use in place of the computed ones (by transformer path), and whether the file held
    any derived buffer at all.

    Each kind follows its reference's loader (both load with `strict=False`): "s1", fish-speech 0.1.0, keeps the
    buffers persistent, so the stored table is the one that rotates and a missing one is built from the config;
    "s2", fish-speech 2.0, keeps them out of the state_dict, so whatever the file stores under those names is
    never read.
    """
    transformers = model.transformers()
    weights, tables = {}, {}
    stored = False
    for key, value in state.items():
        owner, _, name = key.rpartition(".")
        if owner not in transformers or name not in DERIVED_BUFFERS:
            weights[key] = value
            continue
        stored = True
        if kind == "s1" and name == "freqs_cis":
            tables[owner] = value
    return weights, tables, stored


def load_codec(path: str | Path, config: CodecConfig | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, kind: str = "s1") -> Codec:
    """Load a fish `codec.pth` strictly (every weight and shape must match `config`) and cast it.

    The derived buffers (RoPE tables, causal masks) may be in the file or not: `kind`, the checkpoint's ("s1" or
    "s2"), decides what their presence means, as its reference does (`split_derived_buffers`). The module is built
    on the meta device and the memory-mapped tensors are assigned, so nothing is allocated twice; floating
    tensors (the bf16 RoPE tables included) are then cast to `dtype`. No causal mask is ever allocated.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise CheckpointError(f"codec weights {path} not found") from None
    except Exception as exc:  # a corrupt or foreign file can fail in many ways; all mean "unusable"
        raise CheckpointError(f"cannot read codec weights {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict")
    state = unwrap_codec_state_dict(state)
    with torch.device("meta"):
        model = Codec(config)
    try:
        check_codec_state_dict(model, state, kind)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    weights, tables, stored = split_derived_buffers(model, state, kind)
    model.load_state_dict(weights, strict=True, assign=True)
    for name, transformer in model.transformers().items():
        if name in tables:
            transformer.freqs_cis = tables[name]
        elif torch.device(device).type != "meta":
            transformer.reset_rope()
    model.tables = "stored" if tables else "ignored" if stored and kind == "s2" else "derived"
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
