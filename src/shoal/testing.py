"""Helpers for tests: tiny configurations and random-but-sane S1 and S2 checkpoints that build in milliseconds.

Everything random here draws from a seeded `torch.Generator`, never the global RNG, so a (config, seed) pair
always gives the same bytes and tests cannot disturb each other.

`Server` runs a real `shoal serve` process on loopback: the API, UI and hostile tests and `bench/soak.py` share it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import torch
import yaml
from torch import Tensor, nn

from shoal.fish.codec import (DERIVED_BUFFERS, Codec, CodecConfig, RMSNorm, TransformerConfig, reference_codec_config,
                              rope_table)
from shoal.fish.dual_ar import DualARConfig, DualARTransformer

# ----------------------------------------------------------------------------------------------------------------
# Codec
# ----------------------------------------------------------------------------------------------------------------


def tiny_codec_config() -> CodecConfig:
    """The codec of the fish-s1-tiny fixture (its codec_config.yaml): the real structure, small widths, and a
    16-frame attention window so the window limit matters even on short clips."""
    return CodecConfig(
        encoder_dim=8,
        decoder_dim=64,
        encoder_transformer_layers=(0, 0, 0, 1),
        decoder_transformer_layers=(1, 0, 0, 0),
        transformer_block_size=1024,
        quantizer_dim=128,
        quantizer_transformer=TransformerConfig(
            n_layer=1, n_head=2, dim=128, intermediate_size=384, head_dim=64, block_size=512, window_size=16
        ),
    )


def _uniform(shape: torch.Size, low: float, high: float, gen: torch.Generator) -> Tensor:
    return torch.rand(shape, generator=gen) * (high - low) + low


def _normal(shape: torch.Size, std: float, gen: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=gen) * std


def _final_decoder_gain_key(model: Codec) -> str:
    """The weight-norm gain of the conv right before the decoder's tanh."""
    return f"decoder.model.{len(model.decoder.model) - 2}.conv.parametrizations.weight.original0"


def _random_codec_tensor(model: Codec, key: str, like: Tensor, gen: torch.Generator) -> Tensor:
    """One tensor of a random codec. The ranges keep every component visibly active (no near-zero gains, no
    dead Snakes, non-zero biases) while activations stay O(1), so the codes spread over the codebooks and the
    decoder's tanh is not saturated."""
    owner_path, _, name = key.rpartition(".")
    owner = model.get_submodule(owner_path)
    shape = like.shape
    if key == _final_decoder_gain_key(model):  # keeps the pre-tanh signal around std 0.1 to 0.3
        return _uniform(shape, 0.1, 0.2, gen)
    if name in ("original0", "weight_g"):  # weight-norm gain = the norm of each output row of the weight
        return _uniform(shape, 0.5, 1.0, gen)
    if name in ("original1", "weight_v"):  # weight-norm direction; its scale cancels out
        return _normal(shape, 1.0, gen)
    if name == "alpha":  # Snake
        return _uniform(shape, 0.5, 1.5, gen)
    if name == "gamma":  # LayerScale / ConvNeXt
        return _uniform(shape, 0.2, 0.5, gen)
    if isinstance(owner, (RMSNorm, nn.LayerNorm)):
        return _uniform(shape, 0.7, 1.3, gen) if name == "weight" else _normal(shape, 0.1, gen)
    if isinstance(owner, nn.Embedding):  # VQ codebooks
        return _normal(shape, 1.0, gen)
    if name == "bias":
        return _normal(shape, 0.05, gen)
    if isinstance(owner, nn.Linear):
        return _normal(shape, shape[1] ** -0.5, gen)
    if isinstance(owner, nn.ConvTranspose1d):  # weight [in, out, k]; each output sees in * k / stride taps
        return _normal(shape, (shape[0] * shape[2] / owner.stride[0]) ** -0.5, gen)
    if isinstance(owner, nn.Conv1d):  # weight [out, in / groups, k]
        return _normal(shape, (shape[1] * shape[2]) ** -0.5, gen)
    raise AssertionError(f"no random rule for codec tensor {key}")  # a new module type needs a rule


#: The codec layouts fish-speech writes: 0.1.0 keeps the transformers' RoPE tables and causal masks in codec.pth,
#: 2.x (and so S2-Pro's tooling) builds them at init and saves only the weights.
CODEC_LAYOUTS = ("0.1", "2.0")


def with_derived_buffers(model: Codec, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` (a codec's weights) as fish-speech 0.1.0's `DAC.state_dict()` orders it: each transformer's bf16
    `freqs_cis` and bool `causal_mask` (its own buffers) before its first child's key."""
    out = OrderedDict()
    out._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]
    pending = dict(model.transformers())
    for key, value in state.items():
        for owner in [p for p in pending if key.startswith(p + ".")]:
            transformer = pending.pop(owner)
            c = transformer.config
            out[f"{owner}.freqs_cis"] = rope_table(c.block_size, c.head_dim, c.rope_base)
            out[f"{owner}.causal_mask"] = torch.ones(c.block_size, c.block_size, dtype=torch.bool).tril()
        out[key] = value
    return out


def without_derived_buffers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` less the codec transformers' derived buffers: what fish-speech 2.x saves of the same codec."""
    out = OrderedDict((k, v) for k, v in state.items() if k.rpartition(".")[2] not in DERIVED_BUFFERS)
    out._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]
    return out


def random_codec_state_dict(config: CodecConfig | None = None, seed: int = 0,
                            layout: str = "0.1") -> dict[str, Tensor]:
    """A random codec state dict in fish's on-disk format: exactly the keys and order of `DAC.state_dict()` of
    the fish-speech `layout` ("0.1": float32 weights plus the bf16 `freqs_cis` and bool `causal_mask` buffers;
    "2.0": the weights alone), with torch's `_metadata`. The weights are the same in both layouts.

    `config` defaults to `tiny_codec_config()`; a full-size config works too but takes seconds and ~2 GB.
    """
    if layout not in CODEC_LAYOUTS:
        raise ValueError(f"layout must be one of {CODEC_LAYOUTS}, got {layout!r}")
    config = config or tiny_codec_config()
    with torch.device("meta"):
        model = Codec(config)
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()  # an OrderedDict carrying `_metadata`, like the one fish saved
    for key, like in state.items():
        state[key] = _random_codec_tensor(model, key, like, gen)
    return with_derived_buffers(model, state) if layout == "0.1" else state


def write_tiny_codec(path: str | Path, config: CodecConfig | None = None, seed: int = 0,
                     layout: str = "0.1") -> Path:
    """torch.save a random codec (tiny unless `config` says otherwise) to `path`, as fish-speech `layout` saves
    codec.pth."""
    path = Path(path)
    torch.save(random_codec_state_dict(config, seed, layout), path)
    return path


def write_codec_config_yaml(path: str | Path, config: CodecConfig) -> Path:
    """Write `config` as a fish-style `codec_config.yaml` (what `CodecConfig.from_yaml` reads)."""
    path = Path(path)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Tiny text-to-semantic checkpoints
# ---------------------------------------------------------------------------------------------------------------

#: fish-speech 0.1.0's control tokens, in order; the semantic tokens follow them.
CONTROL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<|phoneme_start|>",
    "<|phoneme_end|>", "<|tool_call_start|>", "<|tool_call_end|>", "<|text|>", "<|voice|>", "<|interleave|>",
    "<|audio_start|>", "<|audio_end|>", "<|audio|>",
)
SEMANTIC_TOKENS = 4096  # one per entry of the codec's semantic codebook

#: The published openaudio-s1-mini `config.json` (0.5 B parameters + embeddings).
S1_MINI_CONFIG = {
    "model_type": "dual_ar", "vocab_size": 155776, "n_layer": 28, "n_head": 16, "n_local_heads": 8,
    "dim": 1024, "head_dim": 128, "intermediate_size": 3072, "rope_base": 1000000.0, "norm_eps": 1e-6,
    "max_seq_len": 8192, "tie_word_embeddings": True, "attention_qkv_bias": False, "attention_o_bias": False,
    "attention_qk_norm": True, "codebook_size": 4096, "num_codebooks": 10, "scale_codebook_embeddings": True,
    "n_fast_layer": 4, "fast_dim": 1024, "fast_n_head": 16, "fast_n_local_heads": 8, "fast_head_dim": 64,
    "fast_intermediate_size": 3072, "fast_attention_qkv_bias": False, "fast_attention_qk_norm": False,
    "fast_attention_o_bias": False, "dropout": 0.0, "use_gradient_checkpointing": True,
    "initializer_range": 0.02, "is_reward_model": False,
}

TINY_DIMS = {
    "n_layer": 2, "dim": 32, "n_head": 4, "n_local_heads": 2, "head_dim": 8, "intermediate_size": 64,
    "n_fast_layer": 1, "fast_dim": 32, "fast_n_head": 2, "fast_n_local_heads": 1, "fast_head_dim": 16,
    "fast_intermediate_size": 64, "max_seq_len": 2560, "rope_base": 1000000.0, "norm_eps": 1e-6,
    "attention_qk_norm": True, "fast_attention_qk_norm": True, "scale_codebook_embeddings": True,
    "tie_word_embeddings": False, "codebook_size": 4096, "num_codebooks": 10,
}

# A few byte-pair merges so that tiny tokenizers exercise real BPE, each buildable from earlier entries.
_MERGES = (b"th", b"he", b" t", b"in", b"er", b"an", b" a", b"on", b"re", b"at", b"en", b"es", b"or", b"is",
           b" the", b"ing", b" s", b" w", b"ll", b"ou")


def write_tiny_tokenizer(directory: str | Path) -> int:
    """Write `tokenizer.tiktoken` (256 bytes + a few merges) and `special_tokens.json`; return vocab size."""
    directory = Path(directory)
    ranks = [bytes([b]) for b in range(256)] + list(_MERGES)
    with open(directory / "tokenizer.tiktoken", "w", encoding="ascii") as f:
        for rank, token in enumerate(ranks):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    specials = list(CONTROL_TOKENS) + [f"<|semantic:{i}|>" for i in range(SEMANTIC_TOKENS)]
    table = {token: len(ranks) + i for i, token in enumerate(specials)}
    (directory / "special_tokens.json").write_text(json.dumps(table, indent=2, ensure_ascii=False))
    return len(ranks) + len(specials)


def random_model_state_dict(config: DualARConfig, seed: int, im_end_id: int) -> dict[str, torch.Tensor]:
    """Random but non-degenerate weights in bfloat16, like the released checkpoints.

    Norm weights in [0.7, 1.3], linear layers ~N(0, 1/fan_in), embeddings ~N(0, 1), output layers scaled so
    logits have a std of about 2.5, and the `<|im_end|>` row boosted so that some requests stop on their own.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = DualARTransformer(config, 0, 0)
    state = {}
    for name, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        if name.endswith("norm.weight"):
            value = torch.rand(shape, generator=gen) * 0.6 + 0.7
        elif name.endswith(".bias"):
            value = torch.randn(shape, generator=gen) * 0.02
        elif "embeddings" in name:
            value = torch.randn(shape, generator=gen)
        else:
            value = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
            if name in ("output.weight", "fast_output.weight"):
                value = value * 2.5
        state[name] = value.to(torch.bfloat16)
    head = "embeddings.weight" if config.tie_word_embeddings else "output.weight"
    if im_end_id < state[head].shape[0] and not config.tie_word_embeddings:
        state[head][im_end_id] *= 1.25
    return state


def write_tiny_checkpoint(directory: str | Path, seed: int = 0, **dims) -> Path:
    """Write a random tiny S1 checkpoint in the official on-disk layout and return its directory.

    `dims` override `TINY_DIMS` (any `config.json` key). The tokenizer has 256 byte tokens, a few merges, the
    control tokens and 4096 semantic tokens; the codec is `tiny_codec_config()` (written as
    `codec_config.yaml`). Deterministic for a seed; takes milliseconds.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tiny_tokenizer(directory)
    values = {**TINY_DIMS, **dims, "model_type": "dual_ar", "vocab_size": vocab_size}
    config = DualARConfig.from_dict(values)
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=4, sort_keys=True))
    im_end_id = 256 + len(_MERGES) + CONTROL_TOKENS.index("<|im_end|>")
    torch.save(random_model_state_dict(config, seed, im_end_id), directory / "model.pth")
    codec_config = tiny_codec_config()
    write_codec_config_yaml(directory / "codec_config.yaml", codec_config)
    write_tiny_codec(directory / "codec.pth", codec_config, seed=seed)
    return directory


# ---------------------------------------------------------------------------------------------------------------
# A full-size random checkpoint (benchmarks)
# ---------------------------------------------------------------------------------------------------------------

#: The real openaudio-s1-mini tokenizer: 151,665 BPE ranks, then the 15 control tokens, then 4096 semantic
#: tokens, so `<|semantic:0|>` is id 151680 and the vocabulary is S1_MINI_CONFIG's 155,776.
FULL_SIZE_BPE_RANKS = S1_MINI_CONFIG["vocab_size"] - len(CONTROL_TOKENS) - SEMANTIC_TOKENS


def full_size_ranks() -> list[bytes]:
    """151,665 distinct BPE tokens: the 256 single bytes, the tiny merges, then synthetic filler.

    The filler is made of bytes >= 0x80 only (every pair of them, then triples), so ASCII text tokenises exactly as
    with the tiny tokenizer and the filler only changes how many rows the embedding and output layers have, which
    is what a benchmark needs: a vocabulary of the real size with the semantic tokens at its end.
    """
    import itertools

    ranks = [bytes([b]) for b in range(256)] + list(_MERGES)
    high = range(0x80, 0x100)
    filler = (bytes(t) for n in (2, 3) for t in itertools.product(high, repeat=n))
    ranks += itertools.islice(filler, FULL_SIZE_BPE_RANKS - len(ranks))
    return ranks


@contextlib.contextmanager
def staged(directory: Path) -> Iterator[Path]:
    """A folder to write a checkpoint into, renamed to `directory` when the block ends without error and removed
    when it fails, so that an interrupted run never leaves a half-written checkpoint at `directory`."""
    if directory.exists():
        raise FileExistsError(f"{directory} already exists")
    staging = directory.with_name(directory.name + f".partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_full_size_checkpoint(directory: str | Path, seed: int = 0) -> Path:
    """Write a random checkpoint of openaudio-s1-mini's shape and return its directory.

    S1_MINI_CONFIG dimensions (0.5 B transformer parameters + a 155,776-row tied embedding) in bfloat16 like the
    released weights, a tokenizer of the real size with the semantic tokens at ids 151680-155775, and a codec of
    the real `modded_dac_vq` size (`CodecConfig()` defaults, so no `codec_config.yaml` is written and both shoal
    and the reference use their built-in codec configuration). About 1.4 GB + 1.9 GB on disk, ~4 GB of RAM and a
    minute or so of CPU to write; nothing is downloaded.

    Files are written under a temporary name and the folder is renamed into place when complete, so an
    interrupted run never leaves a half-written checkpoint at `directory`.
    """
    directory = Path(directory)
    with staged(directory) as staging:
        ranks = full_size_ranks()
        with open(staging / "tokenizer.tiktoken", "w", encoding="ascii") as f:
            for rank, token in enumerate(ranks):
                f.write(f"{base64.b64encode(token).decode()} {rank}\n")
        specials = list(CONTROL_TOKENS) + [f"<|semantic:{i}|>" for i in range(SEMANTIC_TOKENS)]
        table = {token: len(ranks) + i for i, token in enumerate(specials)}
        (staging / "special_tokens.json").write_text(json.dumps(table, indent=2, ensure_ascii=False))
        assert len(ranks) + len(specials) == S1_MINI_CONFIG["vocab_size"]

        config = DualARConfig.from_dict(dict(S1_MINI_CONFIG))
        (staging / "config.json").write_text(json.dumps(config.to_dict(), indent=4, sort_keys=True))
        im_end_id = len(ranks) + CONTROL_TOKENS.index("<|im_end|>")
        state = random_model_state_dict(config, seed, im_end_id)
        torch.save(state, staging / "model.pth")
        del state
        write_tiny_codec(staging / "codec.pth", CodecConfig(), seed=seed)
    return directory


# ---------------------------------------------------------------------------------------------------------------
# S2 checkpoints
# ---------------------------------------------------------------------------------------------------------------

#: Fish Audio S2-Pro's published `config.json` (huggingface.co/fishaudio/s2-pro, config.json), nested as shipped.
#: Everything down to text_config's n_layer is as published; the rest of text_config mirrors audio_decoder_config's
#: keys, with tie_word_embeddings true (the published weights hold no output layer: the head is the embedding).
S2_PRO_CONFIG = {
    "audio_decoder_config": {
        "attention_o_bias": False, "attention_qk_norm": False, "attention_qkv_bias": False,
        "audio_hidden_dim": 5120, "dim": 2560, "dropout": 0.0, "head_dim": 128,
        "initializer_range": 0.01976423537605237, "intermediate_size": 9728, "max_seq_len": 11,
        "model_type": "fish_qwen3_audio_decoder", "moe_intermediate_size": 768, "n_head": 32, "n_layer": 4,
        "n_local_heads": 8, "norm_eps": 1e-06, "norm_topk_prob": True, "num_codebooks": 10, "num_experts": 1,
        "num_experts_per_tok": 1, "rope_base": 1000000, "router_gamma": 0.001, "text_dim": 2560,
        "tie_word_embeddings": False, "use_aux_loss_free": False, "use_bfloat16": False,
        "use_gradient_checkpointing": True, "use_moe": False, "vocab_size": 4096,
    },
    "audio_pad_token_id": 151677,
    "dtype": "bfloat16",
    "eos_token_id": 151645,
    "model_type": "fish_qwen3_omni",
    "pad_token_id": 151669,
    "semantic_end_token_id": 155773,
    "semantic_start_token_id": 151678,
    "text_config": {
        "attention_o_bias": False, "attention_qk_norm": True, "attention_qkv_bias": False,
        "audio_hidden_dim": 5120, "dim": 2560, "dropout": 0.0, "head_dim": 128,
        "initializer_range": 0.01976423537605237, "intermediate_size": 9728, "max_seq_len": 32768,
        "model_type": "fish_qwen3", "moe_intermediate_size": 768, "n_head": 32, "n_layer": 36,
        "n_local_heads": 8, "norm_eps": 1e-06, "norm_topk_prob": True, "num_experts": 1, "num_experts_per_tok": 1,
        "rope_base": 1000000, "router_gamma": 0.001, "tie_word_embeddings": True, "use_aux_loss_free": False,
        "use_bfloat16": False, "use_gradient_checkpointing": True, "use_moe": False, "vocab_size": 155776,
    },
}

#: Qwen's own control tokens, then fish 2.0's (fish_speech/tokenizer.py), then speaker tags: the added tokens
#: before the semantic ones, in id order.
S2_CONTROL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|phoneme_start|>", "<|phoneme_end|>", "<|text|>",
    "<|voice|>", "<|interleave|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
)
S2_SPEAKER_TOKENS = tuple(f"<|speaker:{i}|>" for i in range(4))
#: Embedding rows past the last token id (S2-Pro: 155,776 rows for 155,774 tokens).
S2_SPARE_ROWS = 2
# Qwen2/Qwen3's pre-tokenizer split (the `Split` step of their tokenizer.json).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")

TINY_S2_TEXT = {
    "model_type": "fish_qwen3", "n_layer": 2, "n_head": 4, "n_local_heads": 2, "head_dim": 8, "dim": 32,
    "intermediate_size": 64, "rope_base": 1000000, "norm_eps": 1e-6, "max_seq_len": 2560, "dropout": 0.0,
    "tie_word_embeddings": True, "attention_qkv_bias": False, "attention_o_bias": False, "attention_qk_norm": True,
}
TINY_S2_AUDIO = {
    "model_type": "fish_qwen3_audio_decoder", "vocab_size": SEMANTIC_TOKENS, "num_codebooks": 10, "n_layer": 1,
    "n_head": 2, "n_local_heads": 1, "head_dim": 16, "dim": 32, "text_dim": 32, "intermediate_size": 64,
    "rope_base": 1000000, "norm_eps": 1e-6, "max_seq_len": 11, "attention_qkv_bias": False,
    "attention_o_bias": False, "attention_qk_norm": False,
}
S2_SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")  # slow stack, then the rest


def _byte_chars() -> list[str]:
    """The byte-level BPE alphabet: the character that stands for each byte value (GPT-2's and Qwen's map)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def write_tiny_s2_tokenizer(directory: str | Path, bpe_size: int | None = None,
                            speakers: int = len(S2_SPEAKER_TOKENS)) -> dict[str, int]:
    """Write a Qwen-style `tokenizer.json` (256 byte tokens, `_MERGES`, the S2 control and `speakers` speaker
    tokens, then 4096 semantic tokens) and a matching `tokenizer_config.json`; return the added tokens' ids.

    `bpe_size` pads the BPE vocabulary to that many entries with tokens made of bytes >= 0x80 only (never produced
    from ASCII text), so that the added tokens land at a real tokenizer's ids (`write_full_size_s2_checkpoint`)."""
    import itertools

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    directory = Path(directory)
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    merges = []
    for token in _MERGES:
        text = "".join(chars[b] for b in token)
        left, right = next((text[:i], text[i:]) for i in range(1, len(text))
                           if text[:i] in vocab and text[i:] in vocab)
        merges.append((left, right))
        vocab[text] = len(vocab)
    high = [chars[b] for b in range(0x80, 0x100)]
    filler = ("".join(t) for n in (2, 3) for t in itertools.product(high, repeat=n))
    for text in itertools.islice(filler, max(0, (bpe_size or 0) - len(vocab))):
        vocab[text] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    added = [*S2_CONTROL_TOKENS, *(f"<|speaker:{i}|>" for i in range(speakers)),
             *(f"<|semantic:{i}|>" for i in range(SEMANTIC_TOKENS))]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    tok.save(str(directory / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in added}
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config = {
        "added_tokens_decoder": {str(ids[t]): {"content": t, **flags} for t in added},
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "errors": "replace",
        "clean_up_tokenization_spaces": False, "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": TINY_S2_TEXT["max_seq_len"],
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return ids


def s2_config(ids: dict[str, int], text: dict, audio: dict) -> dict:
    """A nested S2 `config.json` for a tokenizer's added-token ids (`write_tiny_s2_tokenizer`)."""
    return {
        "model_type": "fish_qwen3_omni", "dtype": "bfloat16",
        "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|pad|>"], "audio_pad_token_id": ids["<|audio_pad|>"],
        "semantic_start_token_id": ids["<|semantic:0|>"],
        "semantic_end_token_id": ids[f"<|semantic:{SEMANTIC_TOKENS - 1}|>"],
        "text_config": {**text, "vocab_size": max(ids.values()) + 1 + S2_SPARE_ROWS},
        "audio_decoder_config": dict(audio),
    }


def write_s2_weights(directory: str | Path, state: dict[str, Tensor]) -> None:
    """Save a `DualARTransformer` state dict as S2 ships it: official names, the slow stack in the first
    safetensors shard and the rest in the second, and `model.safetensors.index.json`."""
    from safetensors.torch import save_file

    from shoal.fish.checkpoint import S2_SLOW_PREFIX, s2_official_key

    directory = Path(directory)
    official = {s2_official_key(k): v.contiguous() for k, v in state.items()}
    weight_map = {}
    for shard, slow in zip(S2_SHARDS, (True, False)):
        part = {k: v for k, v in sorted(official.items()) if k.startswith(S2_SLOW_PREFIX) == slow}
        save_file(part, str(directory / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in official.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tiny_s2_checkpoint(directory: str | Path, seed: int = 0, text: dict | None = None,
                             audio: dict | None = None) -> Path:
    """Write a random tiny S2 checkpoint in the official layout (nested config.json, two safetensors shards under
    the official names + index, tokenizer.json + tokenizer_config.json, the tiny codec) and return its directory.

    `text` / `audio` update `TINY_S2_TEXT` / `TINY_S2_AUDIO`. Deterministic for a seed; takes a fraction of a second.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ids = write_tiny_s2_tokenizer(directory)
    config = s2_config(ids, {**TINY_S2_TEXT, **(text or {})}, {**TINY_S2_AUDIO, **(audio or {})})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    write_s2_weights(directory, random_model_state_dict(DualARConfig.from_dict(config), seed, ids["<|im_end|>"]))
    codec_config = tiny_codec_config()
    write_codec_config_yaml(directory / "codec_config.yaml", codec_config)
    write_tiny_codec(directory / "codec.pth", codec_config, seed=seed, layout="2.0")  # as fish-speech 2.0 saves it
    return directory


#: S2-Pro's tokenizer: Qwen3's 151,643 BPE ranks, then added tokens up to `<|semantic:0|>` at 151,678.
S2_PRO_BPE_SIZE = S2_PRO_CONFIG["eos_token_id"] - S2_CONTROL_TOKENS.index("<|im_end|>")
S2_PRO_SPEAKERS = S2_PRO_CONFIG["semantic_start_token_id"] - S2_PRO_BPE_SIZE - len(S2_CONTROL_TOKENS)


def write_full_size_s2_checkpoint(directory: str | Path, seed: int = 0) -> Path:
    """Write a random checkpoint of S2-Pro's shape (`S2_PRO_CONFIG`, 4.56 B parameters) and return its directory.

    bfloat16 weights like the released ones, in the official layout (two safetensors shards under the official
    names + index), a tokenizer of the real size (`<|im_end|>` at 151,645, the semantic tokens at
    151,678-155,773) and a codec of the real `modded_dac_vq` size, as fish-speech 2.0.0 builds and saves it. About 9.1 GB + 1.9 GB on disk and ~12 GB of RAM
    to write; nothing is downloaded. Written under a temporary name and renamed into place when complete.
    """
    directory = Path(directory)
    with staged(directory) as staging:
        ids = write_tiny_s2_tokenizer(staging, bpe_size=S2_PRO_BPE_SIZE, speakers=S2_PRO_SPEAKERS)
        assert ids["<|im_end|>"] == S2_PRO_CONFIG["eos_token_id"]
        assert ids["<|semantic:0|>"] == S2_PRO_CONFIG["semantic_start_token_id"]
        (staging / "config.json").write_text(json.dumps(S2_PRO_CONFIG, indent=2))
        state = random_model_state_dict(DualARConfig.from_dict(S2_PRO_CONFIG), seed, ids["<|im_end|>"])
        write_s2_weights(staging, state)
        del state
        write_tiny_codec(staging / "codec.pth", reference_codec_config("s2"), seed=seed, layout="2.0")
    return directory


# ---------------------------------------------------------------------------------------------------------------
# A server process (the API, UI and hostile tests, and bench/soak.py)
# ---------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m shoal serve` with its data dir at `root/data`, its log at `root/server-PORT.log`, run from
    `root` (so no ./checkpoints or .env of the repo is seen). `start()` = `spawn()` + `wait_ready()`; as a context
    manager it is stopped on leaving the block. Talking to it needs httpx (the `test` extra)."""

    def __init__(self, checkpoint: Path | None, root: Path, *extra: str, env: dict | None = None,
                 inherit_env: bool = True):
        """`env` is added to this process's environment, or, with `inherit_env` False, is the whole of it."""
        self.checkpoint, self.root, self.extra = checkpoint, Path(root), extra
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.root / "data"
        self.env = {**(os.environ if inherit_env else {}), "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.root / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def spawn(self) -> "Server":
        args = [sys.executable, "-m", "shoal", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir),
                *self.extra]
        if self.checkpoint is not None:
            args += ["--checkpoint", str(self.checkpoint)]
        self.proc = subprocess.Popen(args, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.root)
        return self

    def wait_ready(self, timeout: float = 120.0) -> "Server":
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/v1/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def start(self, timeout: float = 120.0) -> "Server":
        return self.spawn().wait_ready(timeout)

    def client(self, **kwargs):
        """An `httpx.Client` on the server, with a generous timeout."""
        import httpx

        return httpx.Client(base_url=self.url, timeout=120, **kwargs)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_idle(self, timeout: float = 30.0, interval: float = 0.02) -> dict:
        """Poll /v1/health until no request is queued (`queue_depth`) and no row is waiting or decoding
        (`counters.in_flight`), or until `timeout` s. A body without those two figures is never idle.

        Returns {"idle": bool, "seconds": time taken, "polls": n, "steps": decode steps seen meanwhile (or None),
        "last": the last health body (None if no poll was answered)}."""
        import httpx

        def idle(body: dict | None) -> bool:
            counters = (body or {}).get("counters", {})
            return body is not None and body.get("queue_depth") == 0 and counters.get("in_flight") == 0

        start = time.monotonic()
        first = last = None
        polls = 0
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while True:
                polls += 1
                try:
                    response = client.get("/v1/health")
                    response.raise_for_status()
                    last = response.json()
                except httpx.HTTPError:
                    last = None
                first = first or last
                waited = time.monotonic() - start
                if idle(last) or waited >= timeout:
                    break
                time.sleep(interval if waited < 1.0 else max(interval, 0.05))  # lighter polling on a long drain
        steps = None
        if first is not None and last is not None:
            steps = (last.get("counters", {}).get("decode_steps", 0)
                     - first.get("counters", {}).get("decode_steps", 0))
        return {"idle": idle(last), "seconds": time.monotonic() - start, "polls": polls, "steps": steps, "last": last}

    def stop(self) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None

    def restart(self) -> "Server":
        self.stop()
        return self.start()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
