"""The dual auto-regressive transformer of Fish Speech S1 and S2, written for inference.

A *slow* transformer reads the prompt (text tokens and codec frames) and predicts the next token over the whole
vocabulary; a *fast* transformer then predicts that frame's codebooks one by one from the slow transformer's hidden
state. S1 and S2 differ only in configuration: S2's `config.json` is nested (`fish_qwen3_omni`) and is flattened
here into the same `DualARConfig`, with one switch of its own (`norm_fastlayer_input`). Parameter names equal those
of S1's official `model.pth` and, after `shoal.fish.checkpoint`'s renaming, of S2's safetensors, so both load
with `strict=True`.

Everything is batch-ready: KV caches carry a batch dimension, and positions are per row (`input_pos` is
`[B, S]`), so rows of different lengths can decode side by side.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from shoal.layout import S1_MODEL_TYPE, S2_MODEL_TYPE

# Keys of S2's nested config.json that leave the inference architecture unchanged. The reference reads none of them
# (fish's `_from_fish_qwen3_omni`); shoal accepts them and refuses every other key it does not read.
S2_INERT_KEYS = frozenset({"architectures", "dtype", "torch_dtype", "transformers_version", "bos_token_id",
                           "eos_token_id", "pad_token_id", "audio_pad_token_id", "sample_rate"})
# Mixture-of-experts settings that the official files carry for a dense model (`use_moe: false`); only `use_moe`
# itself is checked.
_MOE_KEYS = frozenset({"use_moe", "moe_intermediate_size", "norm_topk_prob", "num_experts", "num_experts_per_tok",
                       "router_gamma", "use_aux_loss_free"})
S2_TEXT_INERT_KEYS = _MOE_KEYS | {"model_type", "audio_hidden_dim", "use_bfloat16"}
# The audio decoder (fast stack) takes norm_eps and rope_base from text_config in the reference, whatever its own
# say; they are accepted only when equal to text_config's (`flatten_fish_qwen3_omni`).
S2_AUDIO_INERT_KEYS = S2_TEXT_INERT_KEYS | {"text_dim", "dropout", "initializer_range", "max_seq_len",
                                            "tie_word_embeddings", "use_gradient_checkpointing"}
# The text_config keys the reference reads, each a DualARConfig field of the same name. Absent ones take
# DualARConfig's defaults, which are the reference's (`.get` defaults of `_from_fish_qwen3_omni`).
S2_TEXT_KEYS = (
    "vocab_size", "n_layer", "n_head", "n_local_heads", "head_dim", "dim", "intermediate_size", "rope_base",
    "norm_eps", "max_seq_len", "dropout", "tie_word_embeddings", "attention_qkv_bias", "attention_o_bias",
    "attention_qk_norm", "use_gradient_checkpointing", "initializer_range",
)
S2_TEXT_REQUIRED = ("vocab_size", "n_layer", "n_head", "dim")
# (audio_decoder_config key, flat key); absent keys fall back to the slow stack's values.
S2_AUDIO_KEYS = (
    ("vocab_size", "codebook_size"), ("num_codebooks", "num_codebooks"), ("n_layer", "n_fast_layer"),
    ("dim", "fast_dim"), ("n_head", "fast_n_head"), ("n_local_heads", "fast_n_local_heads"),
    ("head_dim", "fast_head_dim"), ("intermediate_size", "fast_intermediate_size"),
    ("attention_qkv_bias", "fast_attention_qkv_bias"), ("attention_qk_norm", "fast_attention_qk_norm"),
    ("attention_o_bias", "fast_attention_o_bias"),
)
S2_AUDIO_REQUIRED = ("vocab_size", "num_codebooks", "n_layer")
# The fast stack's settings that the reference takes from text_config (see S2_AUDIO_INERT_KEYS).
S2_SHARED_KEYS = ("norm_eps", "rope_base")


def _check_keys(section: str, data: dict, known: set | frozenset) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        # A key we do not know may change the architecture; refusing beats silently ignoring it.
        raise ValueError(f"unknown config.json keys{section}: {', '.join(unknown)}")


def _section(data: dict, name: str) -> dict:
    value = data.get(name)
    if not isinstance(value, dict):
        raise ValueError(f"config.json's {name} must be an object, got {type(value).__name__}")
    return value


def flatten_fish_qwen3_omni(data: dict) -> dict:
    """S2's nested `config.json` (`model_type: fish_qwen3_omni`) as the flat `DualARConfig` keys, exactly as the
    reference flattens it (fish's `_from_fish_qwen3_omni`): the slow stack from `text_config`, the fast stack and
    the codebooks from `audio_decoder_config`, absent values left to `DualARConfig`'s defaults (the reference's),
    `scale_codebook_embeddings` and `norm_fastlayer_input` forced on, `semantic_start/end_token_id` kept.

    Stricter than the reference: unknown keys at any level, a mixture-of-experts model, and an audio decoder whose
    norm_eps or rope_base differ from text_config's (the reference would silently use text_config's) are refused.
    """
    text, audio = _section(data, "text_config"), _section(data, "audio_decoder_config")
    _check_keys("", data, {"model_type", "text_config", "audio_decoder_config", "semantic_start_token_id",
                           "semantic_end_token_id"} | S2_INERT_KEYS)
    _check_keys(" in text_config", text, set(S2_TEXT_KEYS) | S2_TEXT_INERT_KEYS)
    _check_keys(" in audio_decoder_config", audio,
                {key for key, _ in S2_AUDIO_KEYS} | S2_AUDIO_INERT_KEYS | set(S2_SHARED_KEYS))
    for section, values, required in (("text_config", text, S2_TEXT_REQUIRED),
                                      ("audio_decoder_config", audio, S2_AUDIO_REQUIRED)):
        missing = [key for key in required if key not in values]
        if missing:
            raise ValueError(f"config.json's {section} lacks {', '.join(missing)}")
        if values.get("use_moe"):
            raise ValueError(f"config.json's {section} describes a mixture-of-experts model (use_moe); shoal runs "
                             "the dense S2 models")
    defaults = {f.name: f.default for f in fields(DualARConfig)}
    for key in S2_SHARED_KEYS:
        if key in audio and audio[key] != text.get(key, defaults[key]):
            raise ValueError(f"config.json's audio_decoder_config.{key} ({audio[key]}) differs from text_config's "
                             f"({text.get(key, defaults[key])}); the reference uses text_config's for both stacks")

    flat: dict = {"model_type": S1_MODEL_TYPE}
    flat.update({key: text.get(key) for key in S2_TEXT_KEYS})
    flat.update(scale_codebook_embeddings=True, norm_fastlayer_input=True,
                semantic_begin_id=data.get("semantic_start_token_id"),
                semantic_end_id=data.get("semantic_end_token_id"),
                audio_embed_dim=audio.get("text_dim", text.get("dim")))
    flat.update({flat_key: audio.get(key) for key, flat_key in S2_AUDIO_KEYS})
    return {key: value for key, value in flat.items() if value is not None}


@dataclass
class DualARConfig:
    """Hyper-parameters as S1's flat `config.json` spells them (fish's `DualARModelArgs`); S2's nested config is
    flattened into the same fields by `from_dict` (`flatten_fish_qwen3_omni`).

    Unset fast_* values fall back to their slow counterparts, as in the reference.
    """

    model_type: str = "dual_ar"
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    dim: int = 4096
    intermediate_size: int | None = None
    n_local_heads: int = -1
    head_dim: int | None = 64
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_word_embeddings: bool = True
    attention_qkv_bias: bool = False
    attention_o_bias: bool = False
    attention_qk_norm: bool = False
    codebook_size: int = 160
    num_codebooks: int = 4
    scale_codebook_embeddings: bool = False
    n_fast_layer: int = 4
    fast_dim: int | None = None
    fast_n_head: int | None = None
    fast_n_local_heads: int | None = None
    fast_head_dim: int | None = None
    fast_intermediate_size: int | None = None
    fast_attention_qkv_bias: bool | None = None
    fast_attention_qk_norm: bool | None = None
    fast_attention_o_bias: bool | None = None
    # S2: the fast stack reads the slow stack's final-normed hidden state instead of the raw one.
    norm_fastlayer_input: bool = False
    # S2's config.json states the semantic token range; the model takes it from the tokenizer (as the reference
    # does) and loading checks the two agree. S1 configs do not carry it.
    semantic_begin_id: int | None = None
    semantic_end_id: int | None = None
    # Training-only switches that config.json carries; they have no effect at inference.
    dropout: float = 0.0
    use_gradient_checkpointing: bool = True
    initializer_range: float = 0.02
    is_reward_model: bool = False
    # The audio projector's width (S2's audio_decoder_config.text_dim; fish-speech 2.0's flat args, which its LoRA
    # merge saves, carry it): a training module that text-to-speech never builds.
    audio_embed_dim: int | None = None

    def __post_init__(self) -> None:
        if self.model_type != S1_MODEL_TYPE:
            raise ValueError(f"unsupported model_type {self.model_type!r}: shoal runs {S1_MODEL_TYPE!r} (S1) and "
                             f"{S2_MODEL_TYPE!r} (S2) checkpoints")
        if self.is_reward_model:
            raise ValueError("reward-model checkpoints are not text-to-speech models")
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        if self.intermediate_size is None:
            hidden = int(2 * 4 * self.dim / 3)
            self.intermediate_size = hidden + (-hidden) % 256
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_head
        self.fast_dim = self.fast_dim or self.dim
        self.fast_n_head = self.fast_n_head or self.n_head
        self.fast_n_local_heads = self.fast_n_local_heads or self.n_local_heads
        self.fast_head_dim = self.fast_head_dim or self.head_dim
        self.fast_intermediate_size = self.fast_intermediate_size or self.intermediate_size
        for name in ("attention_qkv_bias", "attention_qk_norm", "attention_o_bias"):
            if getattr(self, "fast_" + name) is None:
                setattr(self, "fast_" + name, getattr(self, name))
        if self.n_head % self.n_local_heads or self.fast_n_head % self.fast_n_local_heads:
            raise ValueError("n_head must be a multiple of n_local_heads")

    @classmethod
    def from_dict(cls, data: dict) -> "DualARConfig":
        """A flat S1 config, or a nested S2 one (`model_type: fish_qwen3_omni`), flattened first."""
        if data.get("model_type") == S2_MODEL_TYPE:
            data = flatten_fish_qwen3_omni(data)
        _check_keys("", data, {f.name for f in fields(cls)})
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> "DualARConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        return asdict(self)

    def slow(self) -> "BlockDims":
        return BlockDims(self.dim, self.n_head, self.n_local_heads, self.head_dim, self.intermediate_size,
                         self.attention_qkv_bias, self.attention_o_bias, self.attention_qk_norm, self.norm_eps)

    def fast(self) -> "BlockDims":
        return BlockDims(self.fast_dim, self.fast_n_head, self.fast_n_local_heads, self.fast_head_dim,
                         self.fast_intermediate_size, self.fast_attention_qkv_bias, self.fast_attention_o_bias,
                         self.fast_attention_qk_norm, self.norm_eps)


@dataclass(frozen=True)
class BlockDims:
    """What one transformer block needs to know; the slow and the fast stacks differ only in these."""

    dim: int
    n_head: int
    n_local_heads: int
    head_dim: int
    intermediate_size: int
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    norm_eps: float


def rope_table(seq_len: int, head_dim: int, base: float) -> Tensor:
    """cos/sin table `[seq_len, head_dim // 2, 2]`, computed in float32 and rounded to bfloat16.

    The rounding is deliberate: fish stores these tables as bf16 and keeps the rounded values when the model
    is cast to float32, so exact parity needs the same rounded angles.
    """
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=freqs.device), freqs)
    cis = torch.polar(torch.ones_like(angles), angles)
    return torch.stack([cis.real, cis.imag], dim=-1).to(torch.bfloat16)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]). x: [B, S, H, D]; rope: [B, S, D/2, 2] (float32 math)."""
    xp = x.float().reshape(*x.shape[:-1], -1, 2)
    rope = rope.unsqueeze(2)  # broadcast over heads
    out = torch.stack(
        [
            xp[..., 0] * rope[..., 0] - xp[..., 1] * rope[..., 1],
            xp[..., 1] * rope[..., 0] + xp[..., 0] * rope[..., 1],
        ],
        dim=-1,
    )
    return out.flatten(3).type_as(x)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 whatever the activation dtype, then scaled in the activation dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class KVCache(nn.Module):
    """Static per-layer cache `[B, H_kv, S_max, D]`; rows write at their own positions."""

    def __init__(self, batch: int, heads: int, seq_len: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        shape = (batch, heads, seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int | None, input_pos: Tensor, k: Tensor, v: Tensor,
               n_keys: int) -> tuple[Tensor, Tensor]:
        """Write k/v `[B, S, H, D]` at positions `input_pos` `[B, S]` of cache rows start..start+B-1 (None: 0).

        Returns the first `n_keys` cached positions of those rows, `[B, H, n_keys, D]`: views of the cache,
        never a copy (the scheduler keeps the rows it decodes together in contiguous slots for this).
        """
        bsz = k.shape[0]
        lo = start or 0
        keys, values = self.k[lo : lo + bsz], self.v[lo : lo + bsz]
        batch = torch.arange(bsz, device=k.device)[:, None]
        keys[batch, :, input_pos] = k
        values[batch, :, input_pos] = v
        return keys[:, :, :n_keys], values[:, :, :n_keys]


class Attention(nn.Module):
    def __init__(self, d: BlockDims):
        super().__init__()
        self.d = d
        self.wqkv = nn.Linear(d.dim, (d.n_head + 2 * d.n_local_heads) * d.head_dim, bias=d.qkv_bias)
        self.wo = nn.Linear(d.n_head * d.head_dim, d.dim, bias=d.o_bias)
        if d.qk_norm:
            self.q_norm = nn.RMSNorm(d.head_dim, eps=d.norm_eps)
            self.k_norm = nn.RMSNorm(d.head_dim, eps=d.norm_eps)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, rows: int | None, input_pos: Tensor) -> Tensor:
        d = self.d
        bsz, seqlen, _ = x.shape
        q_size, kv_size = d.n_head * d.head_dim, d.n_local_heads * d.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(bsz, seqlen, d.n_head, d.head_dim)
        k = k.view(bsz, seqlen, d.n_local_heads, d.head_dim)
        v = v.view(bsz, seqlen, d.n_local_heads, d.head_dim)
        if d.qk_norm:  # before RoPE, as trained
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)

        assert self.kv_cache is not None, "call setup_caches() before running the model"
        keys, values = self.kv_cache.update(rows, input_pos, k, v, n_keys=mask.shape[-1])
        # Query head h reads kv head h // group (grouped-query attention).
        group = d.n_head // d.n_local_heads
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(bsz, seqlen, q_size))


class FeedForward(nn.Module):
    def __init__(self, d: BlockDims):
        super().__init__()
        self.w1 = nn.Linear(d.dim, d.intermediate_size, bias=False)
        self.w3 = nn.Linear(d.dim, d.intermediate_size, bias=False)
        self.w2 = nn.Linear(d.intermediate_size, d.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, d: BlockDims):
        super().__init__()
        self.attention = Attention(d)
        self.feed_forward = FeedForward(d)
        self.attention_norm = RMSNorm(d.dim, d.norm_eps)
        self.ffn_norm = RMSNorm(d.dim, d.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, rows: int | None, input_pos: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, rows, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


def causal_mask(input_pos: Tensor, n_keys: int) -> Tensor:
    """Boolean mask `[B, 1, S, n_keys]`: a query at position p sees keys 0..p of its own row."""
    keys = torch.arange(n_keys, device=input_pos.device)
    return (keys[None, None, :] <= input_pos[:, :, None]).unsqueeze(1)


class DualARTransformer(nn.Module):
    """Slow + fast transformer. `semantic_begin_id`/`semantic_end_id` come from the tokenizer."""

    def __init__(self, config: DualARConfig, semantic_begin_id: int, semantic_end_id: int):
        super().__init__()
        c = self.config = config
        self.semantic_begin_id = semantic_begin_id
        self.semantic_end_id = semantic_end_id

        self.embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.codebook_embeddings = nn.Embedding(c.codebook_size * c.num_codebooks, c.dim)
        self.layers = nn.ModuleList(TransformerBlock(c.slow()) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        if not c.tie_word_embeddings:
            self.output = nn.Linear(c.dim, c.vocab_size, bias=False)

        self.fast_project_in = nn.Linear(c.dim, c.fast_dim) if c.fast_dim != c.dim else nn.Identity()
        self.fast_embeddings = nn.Embedding(c.codebook_size, c.fast_dim)
        self.fast_layers = nn.ModuleList(TransformerBlock(c.fast()) for _ in range(c.n_fast_layer))
        self.fast_norm = RMSNorm(c.fast_dim, c.norm_eps)
        self.fast_output = nn.Linear(c.fast_dim, c.codebook_size, bias=False)

        self.register_buffer("rope", torch.empty(0), persistent=False)
        self.register_buffer("fast_rope", torch.empty(0), persistent=False)
        self.reset_rope()
        self.cache_batch = 0
        self.cache_seq_len = 0

    def reset_rope(self) -> None:
        """(Re)compute the RoPE tables on the CPU, then move them to where the weights live.

        Computing on the CPU keeps the bf16-rounded angles identical on every device. Call this after
        materialising a model that was built on the `meta` device.
        """
        c = self.config
        device, dtype = self.embeddings.weight.device, self.embeddings.weight.dtype
        if device.type == "meta":
            self.rope = torch.empty(c.max_seq_len, c.head_dim // 2, 2, device=device, dtype=torch.bfloat16)
            self.fast_rope = torch.empty(c.num_codebooks, c.fast_head_dim // 2, 2, device=device,
                                         dtype=torch.bfloat16)
            return
        # Stored in the weights' float dtype: the values stay bf16-rounded either way.
        self.rope = rope_table(c.max_seq_len, c.head_dim, c.rope_base).to(device, dtype)
        self.fast_rope = rope_table(c.num_codebooks, c.fast_head_dim, c.rope_base).to(device, dtype)

    # -- caches ------------------------------------------------------------------------------------------------
    def setup_caches(self, batch: int, seq_len: int | None = None, dtype: torch.dtype | None = None) -> None:
        """Allocate static KV caches for `batch` rows of up to `seq_len` positions (default: max_seq_len)."""
        c = self.config
        seq_len = min(seq_len or c.max_seq_len, c.max_seq_len)
        dtype = dtype or self.embeddings.weight.dtype
        device = self.embeddings.weight.device
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch, c.n_local_heads, seq_len, c.head_dim, dtype, device)
        for layer in self.fast_layers:
            layer.attention.kv_cache = KVCache(batch, c.fast_n_local_heads, c.num_codebooks, c.fast_head_dim,
                                               dtype, device)
        self.cache_batch, self.cache_seq_len = batch, seq_len

    def move_cache_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slow-cache row `src` to row `dst` (a row changing slots). The
        fast caches hold nothing between frames, so they are not copied."""
        for layer in self.layers:
            cache = layer.attention.kv_cache
            cache.k[dst, :, :length] = cache.k[src, :, :length]
            cache.v[dst, :, :length] = cache.v[src, :, :length]

    # -- slow transformer --------------------------------------------------------------------------------------
    def embed(self, inp: Tensor) -> Tensor:
        """inp `[B, 1 + num_codebooks, S]` -> `[B, S, dim]`.

        Codebook embeddings are added only where row 0 holds a semantic token, then that whole sum is scaled
        by 1/sqrt(num_codebooks + 1) when the config says so. Elsewhere rows 1.. are ignored, even if non-zero.
        """
        c = self.config
        offsets = torch.arange(c.num_codebooks, device=inp.device)[None, :, None] * c.codebook_size
        codebook = self.codebook_embeddings(inp[:, 1:] + offsets)  # [B, C, S, dim]
        codebook = codebook.sum(dim=1)
        tokens = inp[:, 0]
        is_semantic = ((tokens >= self.semantic_begin_id) & (tokens <= self.semantic_end_id)).unsqueeze(-1)
        x = self.embeddings(tokens) + torch.where(is_semantic, codebook, torch.zeros_like(codebook))
        if c.scale_codebook_embeddings:
            x = torch.where(is_semantic, x / math.sqrt(c.num_codebooks + 1), x)
        return x

    def forward_slow(self, inp: Tensor, input_pos: Tensor, rows: int | None = None,
                     n_keys: int | None = None, all_positions: bool = False) -> tuple[Tensor, Tensor]:
        """Run the slow transformer over `inp` `[B, 11, S]` at positions `input_pos` `[B, S]`.

        Returns (logits of the last position `[B, vocab]`, the fast transformer's input for it `[B, fast_dim]`):
        `fast_project_in` of the last hidden state, taken before the final norm (S1) or after it (S2,
        `norm_fastlayer_input`). With `all_positions`, both are for every position, `[B, S, ...]` (teacher forcing).
        The batch uses cache rows rows..rows+B-1 (default 0..B-1); `n_keys` bounds the attended cache length
        (default: up to the furthest position, which costs a device-to-host copy: the scheduler passes it from its
        own bookkeeping).
        """
        n_keys = n_keys or int(input_pos.max()) + 1
        x = self.embed(inp)
        rope = self.rope[input_pos]
        mask = causal_mask(input_pos, n_keys)
        for layer in self.layers:
            x = layer(x, rope, mask, rows, input_pos)
        hidden = x if all_positions else x[:, -1]
        normed = self.norm(hidden)
        logits = F.linear(normed, self.embeddings.weight) if self.config.tie_word_embeddings else self.output(normed)
        return logits, self.fast_project_in(normed if self.config.norm_fastlayer_input else hidden)

    # -- fast transformer --------------------------------------------------------------------------------------
    def forward_fast(self, x: Tensor, pos: int | Tensor, rows: int | None = None,
                     n_keys: int | None = None) -> Tensor:
        """One fast step: x `[B, fast_dim]` at codebook position `pos` -> logits `[B, codebook_size]`.

        Position 0 takes the slow hidden state and overwrites the cache from the start, so no reset is needed
        between frames: later positions only ever see keys written for the current frame. `pos` may be an int
        or a `[B, 1]` tensor (one graph for every position when compiled); `n_keys` (default pos + 1) may be
        larger, the mask hides the keys past `pos`.
        """
        if isinstance(pos, Tensor):
            input_pos, n_keys = pos, n_keys or self.config.num_codebooks
        else:
            input_pos = torch.full((x.shape[0], 1), pos, dtype=torch.long, device=x.device)
            n_keys = n_keys or pos + 1
        rope = self.fast_rope[input_pos]
        mask = causal_mask(input_pos, n_keys)
        h = x[:, None]
        for layer in self.fast_layers:
            h = layer(h, rope, mask, rows, input_pos)
        return self.fast_output(self.fast_norm(h[:, 0]))
