"""Write the fish-s2-tiny fixture (a tiny S2 checkpoint in the official layout, and golden outputs) with the
reference implementation, fish-speech 2.0.0 at the commit setup.sh pins.

Run with the python of the venv that setup.sh builds (regenerate.sh does all of it in one command):

    VENV/bin/python make_fixture.py build      --out DIR --clip reference.wav   # checkpoint + goldens + checks
    VENV/bin/python make_fixture.py checkpoint --out DIR --clip reference.wav   # the checkpoint files only
    VENV/bin/python make_fixture.py replay --checkpoint DIR --names a,b --out X.npz [--threads N]

`build` does, in order:
1. the checkpoint: a Qwen-style byte-level BPE `tokenizer.json` built with the `tokenizers` library and saved
   through transformers' `Qwen2TokenizerFast` (which writes `tokenizer_config.json` naming the class); a
   `DualARTransformer` built from the nested `config.json` by fish's own `_from_fish_qwen3_omni`, given random
   but non-degenerate weights from a seeded generator, cast to bfloat16 and written under the official key names
   in two safetensors shards plus `model.safetensors.index.json`; the tiny codec written by fish-speech 2.0's own
   `DAC.state_dict()` (`write_codec`: the weights of tests/fixtures/fish-s1-tiny's codec, no RoPE tables or masks)
   with `codec_config.yaml` (this folder's: 2.0.0's yaml scaled down); the reference clips. Then the reference loads it
   and every parameter of the model and the codec is checked to come from the files;
2. the golden outputs, through the engine exactly as fish's API server runs it (`launch_thread_safe_queue`,
   the codec through `load_model`, `TTSInferenceEngine.inference(ServeTTSRequest(...))`), with fish's
   module-level `generate` and `sample` and the model's `forward_generate_fast` wrapped at run time to record
   what passes through them, and the engine's `decode_vq_tokens` wrapped to record the codes it gets and to hand
   the codec a copy (see the README: on CPU the codec's in-place clamp would otherwise race with the generation
   thread). Teacher-forced logits come from `forward_generate` over each recorded prompt;
3. `lora-merged/`: the checkpoint fish-speech's LoRA-merge tool writes from this one (`write_lora_merged`), with
   the merged model's teacher-forced logits;
4. the determinism checks: all requests again in fresh processes without the recording wrappers, twice in order
   and once in reverse order. Results go to determinism.json.

Everything is float32 on CPU at 2 torch threads, compile=False. Rebuilding gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
S1_FIXTURE = REPO / "tests" / "fixtures" / "fish-s1-tiny"
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import s2ref  # noqa: E402

TORCH_THREADS = 2
WEIGHT_SEED = 20260407
IM_END_GAIN = 1.6  # the <|im_end|> row of the (tied) embedding / output matrix is scaled by this (see README)
OUTPUT_LOGIT_STD = 2.5  # slow (tied) / fast output layers give logits with about this std
NUM_MERGES = 320
SAMPLE_RATE = 44100
CLIP_TEXT = "This is a short reference recording."
CLIP_B_SPEEDUP = 1.25  # reference_b.wav is reference.wav played this much faster (higher, shorter voice)
CLIP_B_GAIN = 0.8
EXTRA_VOCAB_ROWS = 2  # embedding rows past the last tokenizer id, as in the real checkpoint (155776 = 155774 + 2)
NUM_SPEAKER_TOKENS = 10
FULL_LOGITS = ("single", "noref")  # requests whose teacher-forced logits are kept for every prompt row (size)

# Qwen2's pre-tokenizer split (the `Split` step of Qwen2/Qwen3 tokenizer.json files).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # Qwen's own, at their Qwen order

TEXT_CONFIG = dict(
    model_type="fish_qwen3", n_layer=2, n_head=4, n_local_heads=2, head_dim=16, dim=32, intermediate_size=96,
    rope_base=1000000.0, norm_eps=1e-6, max_seq_len=4096, dropout=0.0, tie_word_embeddings=True,
    attention_qkv_bias=False, attention_o_bias=False, attention_qk_norm=True,
)
AUDIO_DECODER_CONFIG = dict(
    model_type="fish_qwen3_audio_decoder", vocab_size=4096, num_codebooks=10, n_layer=1, n_head=4,
    n_local_heads=2, head_dim=8, dim=32, text_dim=32, intermediate_size=96, rope_base=1000000.0, norm_eps=1e-6,
    max_seq_len=11, dropout=0.0, tie_word_embeddings=False, attention_qkv_bias=False, attention_o_bias=False,
    attention_qk_norm=False,
)
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")  # text_model.*, audio_decoder.*

CLIPS = {"a": ("reference.wav", "reference.txt", CLIP_TEXT), "b": ("reference_b.wav", "reference_b.txt", CLIP_TEXT)}
DEFAULTS = dict(streaming=False, use_memory_cache="off", normalize=True, format="wav")
REQUESTS = [
    dict(name="single", text="Hello world, this is a test of the second model.", references=["a"], seed=1,
         temperature=0.8, top_p=0.8, max_new_tokens=24, chunk_length=200),
    dict(name="noref", text="The quick brown fox jumps over the lazy dog.", references=[], seed=2,
         temperature=0.7, top_p=0.9, max_new_tokens=24, chunk_length=200),
    dict(name="two_speakers", text="<|speaker:0|>Good morning, how are you today?<|speaker:1|>I am fine, thank you.",
         references=["a", "b"], seed=3, temperature=0.8, top_p=0.95, max_new_tokens=24, chunk_length=200),
    dict(name="tags", text="[whisper] I have a secret to tell you. [laughing] That was very funny!",
         references=[], seed=4, temperature=1.0, top_p=0.7, max_new_tokens=24, chunk_length=200),
    dict(name="cjk", text="你好，世界。今天的天气很好。こんにちは、元気ですか。", references=[], seed=5,
         temperature=0.6, top_p=0.8, max_new_tokens=24, chunk_length=200),
    dict(name="multibatch",
         text="<|speaker:0|>The first turn is long enough to fill most of one batch on its own, as you see."
              "<|speaker:1|>The second turn answers it with a few more words.<|speaker:0|>Then the first one ends.",
         references=["a"], seed=6, temperature=0.8, top_p=0.8, max_new_tokens=16, chunk_length=100),
]


def request_specs() -> list[dict]:
    return [{**r, "file": f"gen_{r['name']}.npz", **DEFAULTS} for r in REQUESTS]


def serve_request(spec: dict, folder: Path):
    refs = [(folder / CLIPS[k][0], CLIPS[k][2]) for k in spec["references"]]
    fields = {k: spec[k] for k in ("seed", "temperature", "top_p", "max_new_tokens", "chunk_length", *DEFAULTS)}
    return s2ref.tts_request(spec["text"], refs, **fields)


# -----------------------------------------------------------------------------------------------------------
# Tokenizer: a Qwen-style byte-level BPE, trained here
# -----------------------------------------------------------------------------------------------------------


def byte_chars() -> list[str]:
    """The byte-level alphabet: the character each byte value stands for (GPT-2 / Qwen's byte-to-unicode map)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | \
        set(range(ord("®"), ord("ÿ") + 1))
    chars, shifted = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def qwen_pipeline():
    """(normalizer, pre_tokenizer) of Qwen2/Qwen3's tokenizer.json: NFC, the split regex (isolated pieces), and
    the byte-level mapping without its own regex."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    normalizer = normalizers.NFC()
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return normalizer, pre


def train_merges(text: str, merges: int) -> list[tuple[str, str]]:
    """`merges` BPE merges learnt from `text` cut into pieces by the tokenizer's own pipeline. Each round merges the
    most frequent adjacent pair inside pieces (ties: the lexicographically smallest pair), so training is
    deterministic; a pair whose concatenation is already a token is merged without a new entry."""
    import collections

    normalizer, pre = qwen_pipeline()
    counts = collections.Counter(piece for line in text.splitlines(keepends=True)
                                 for piece, _ in pre.pre_tokenize_str(normalizer.normalize_str(line)))
    words = {piece: list(piece) for piece in counts}
    known = set(byte_chars())
    out: list[tuple[str, str]] = []
    while len(out) < merges:
        pairs: collections.Counter = collections.Counter()
        for piece, parts in words.items():
            for a, b in zip(parts, parts[1:]):
                pairs[(a, b)] += counts[piece]
        if not pairs:
            raise SystemExit("the BPE corpus is too small for the requested merges")
        best = max(pairs.values())
        a, b = min(p for p, n in pairs.items() if n == best)
        if a + b not in known:
            out.append((a, b))
            known.add(a + b)
        for piece, parts in words.items():
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            words[piece] = merged
    return out


def special_tokens() -> list[str]:
    """Every added token in id order: Qwen's three, fish 2.0's other control tokens (fish_speech/tokenizer.py),
    the speaker tags, then all 4096 semantic tokens, last (as in the real tokenizer)."""
    from fish_speech.tokenizer import ALL_SPECIAL_TOKENS, SEMANTIC_TOKENS

    fish_control = [t for t in ALL_SPECIAL_TOKENS if t not in SEMANTIC_TOKENS and t not in QWEN_CONTROL]
    speakers = [f"<|speaker:{i}|>" for i in range(NUM_SPEAKER_TOKENS)]
    return QWEN_CONTROL + fish_control + speakers + list(SEMANTIC_TOKENS)


def write_tokenizer(out: Path) -> dict:
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import Qwen2TokenizerFast

    corpus = (REPO / "tools/reference/s1/bpe_corpus.txt").read_text() + (HERE / "cjk_corpus.txt").read_text()
    merges = train_merges(corpus, NUM_MERGES)
    vocab = {c: i for i, c in enumerate(byte_chars())}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=False))
    tok.normalizer, tok.pre_tokenizer = qwen_pipeline()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel()
    # Every ByteLevel step as Qwen2/Qwen3's tokenizer.json has it (the bindings do not take all of these options).
    spec = json.loads(tok.to_str())
    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    for part in (spec["pre_tokenizer"]["pretokenizers"][1], spec["decoder"], spec["post_processor"]):
        assert part["type"] == "ByteLevel", part
        part.update(byte_level)
    tok = Tokenizer.from_str(json.dumps(spec))
    specials = special_tokens()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    hf = Qwen2TokenizerFast(tokenizer_object=tok, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                            pad_token="<|endoftext|>", errors="replace", clean_up_tokenization_spaces=False,
                            split_special_tokens=False, model_max_length=TEXT_CONFIG["max_seq_len"])
    hf.save_pretrained(out)
    ids = {t: tok.token_to_id(t) for t in specials}
    assert [ids[t] for t in specials] == list(range(len(vocab), len(vocab) + len(specials))), "added ids not dense"
    assert tok.get_vocab_size() == len(vocab) + len(specials)
    return {"bpe_tokens": len(vocab), "merges": len(merges), "ids": ids, "size": tok.get_vocab_size()}


# -----------------------------------------------------------------------------------------------------------
# Config and random weights
# -----------------------------------------------------------------------------------------------------------


def model_config(tokenizer: dict) -> dict:
    ids = tokenizer["ids"]
    return {
        "model_type": "fish_qwen3_omni",
        "architectures": ["FishQwen3OmniForCausalLM"],
        "dtype": "bfloat16",
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|pad|>"],
        "audio_pad_token_id": ids["<|audio_pad|>"],
        "semantic_start_token_id": ids["<|semantic:0|>"],
        "semantic_end_token_id": ids[f"<|semantic:{AUDIO_DECODER_CONFIG['vocab_size'] - 1}|>"],
        "text_config": {**TEXT_CONFIG, "vocab_size": tokenizer["size"] + EXTRA_VOCAB_ROWS},
        "audio_decoder_config": dict(AUDIO_DECODER_CONFIG),
    }


def uniform(shape, low, high, gen) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen)


def normal(shape, std, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def init_model_weights(model, seed: int, im_end_id: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):  # norm, fast_norm, attention_norm, ffn_norm, q_norm, k_norm
                p.copy_(uniform(p.shape, 0.7, 1.3, gen))
            elif leaf == "embeddings":  # tied: the slow output layer too
                p.copy_(normal(p.shape, OUTPUT_LOGIT_STD / math.sqrt(p.shape[1]), gen))
            elif leaf in ("codebook_embeddings", "fast_embeddings"):
                p.copy_(normal(p.shape, 1.0, gen))
            elif leaf == "fast_output":
                p.copy_(normal(p.shape, OUTPUT_LOGIT_STD / math.sqrt(p.shape[1]), gen))
            elif p.ndim == 2:
                p.copy_(normal(p.shape, 1 / math.sqrt(p.shape[1]), gen))
            else:
                raise SystemExit(f"no init rule for model parameter {name} {tuple(p.shape)}")
        model.embeddings.weight[im_end_id] *= IM_END_GAIN


def official_name(fish_name: str) -> str:
    """The checkpoint key of a DualARTransformer parameter: the inverse of fish's _remap_fish_qwen3_omni_keys."""
    if fish_name.startswith("codebook_embeddings."):
        return "audio_decoder." + fish_name
    if fish_name.startswith("fast_"):
        return "audio_decoder." + fish_name[len("fast_"):]
    return "text_model.model." + fish_name


def write_weights(out: Path, model) -> dict:
    from safetensors.torch import save_file

    from fish_speech.models.text2semantic.llama import _remap_fish_qwen3_omni_keys

    state = {official_name(k): v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    back = _remap_fish_qwen3_omni_keys(dict(state))
    assert sorted(back) == sorted(model.state_dict()), "official names do not map back to fish's"
    weight_map = {}
    for shard in SHARDS:
        prefix = "text_model." if shard == SHARDS[0] else "audio_decoder."
        part = {k: state[k] for k in sorted(state) if k.startswith(prefix)}
        save_file(part, str(out / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    assert sorted(weight_map) == sorted(state)
    index = {"metadata": {"total_parameters": sum(v.numel() for v in state.values()),
                          "total_size": sum(v.numel() * v.element_size() for v in state.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index["metadata"]


# -----------------------------------------------------------------------------------------------------------
# Clips and the checkpoint
# -----------------------------------------------------------------------------------------------------------


def write_clips(out: Path, clip: Path) -> None:
    """reference.wav (a copy of --clip) and reference_b.wav, the same clip CLIP_B_SPEEDUP times faster (linear
    interpolation in float64, scaled by CLIP_B_GAIN, PCM16), with their transcripts."""
    import soundfile

    shutil.copyfile(clip, out / CLIPS["a"][0])
    audio, rate = soundfile.read(out / CLIPS["a"][0], dtype="int16")
    assert rate == SAMPLE_RATE and audio.ndim == 1, (rate, audio.shape)
    source = audio.astype(np.float64)
    positions = np.arange(0, len(source) - 1, CLIP_B_SPEEDUP)
    faster = np.interp(positions, np.arange(len(source)), source) * CLIP_B_GAIN
    soundfile.write(out / CLIPS["b"][0], np.round(faster).astype(np.int16), SAMPLE_RATE, subtype="PCM_16")
    for wav, txt, text in CLIPS.values():
        (out / txt).write_text(text + "\n")


def write_checkpoint(out: Path, clip: Path) -> dict:
    from fish_speech.models.text2semantic.llama import BaseModelArgs, DualARTransformer

    out.mkdir(parents=True, exist_ok=True)
    write_clips(out, clip)
    tokenizer = write_tokenizer(out)
    config = model_config(tokenizer)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    args = BaseModelArgs.from_pretrained(str(out / "config.json"))  # fish's own flattening
    args.semantic_begin_id, args.semantic_end_id = config["semantic_start_token_id"], config["semantic_end_token_id"]
    model = DualARTransformer(args)
    init_model_weights(model, WEIGHT_SEED, tokenizer["ids"]["<|im_end|>"])
    size = write_weights(out, model)
    codec = write_codec(out)
    return {"codec": codec, "weight_seed": WEIGHT_SEED, "im_end_gain": IM_END_GAIN, "tokenizer": {k: v for k, v in tokenizer.items()
                                                                                 if k != "ids"}, "weights": size}


def write_codec(out: Path) -> dict:
    """codec.pth as fish-speech 2.0.0 writes it: its own `DAC`, built from this folder's codec_config.yaml (2.0.0's
    `modded_dac_vq.yaml` scaled down), given the weights of the S1 fixture's codec (so that both fixtures share
    one codec's numerics) and saved with `DAC.state_dict()`: the weights alone, since 2.0's RoPE tables and
    causal masks are non-persistent buffers. The S1 file's tables and masks are the only keys the DAC leaves."""
    import fish_speech
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    shutil.copyfile(HERE / s2ref.CODEC_YAML, out / s2ref.CODEC_YAML)
    # fish's own full-size yaml, which shoal's default codec config for S2 checkpoints must equal
    shutil.copyfile(Path(fish_speech.__file__).parent / "configs" / "modded_dac_vq.yaml",
                    out / "reference_modded_dac_vq.yaml")
    dac = instantiate(OmegaConf.load(out / s2ref.CODEC_YAML))
    weights = torch.load(S1_FIXTURE / "codec.pth", map_location="cpu", weights_only=True)
    result = dac.load_state_dict(weights, strict=False)
    left = set(result.unexpected_keys) - s2ref.non_persistent_buffers(dac)
    if result.missing_keys or left:
        raise SystemExit(f"the S1 codec's weights do not fit the S2 codec config: missing {result.missing_keys[:5]}, "
                         f"unexpected {sorted(left)[:5]}")
    state = dac.state_dict()
    torch.save(state, out / "codec.pth")
    return {"written_by": "fish_speech.models.dac.modded_dac.DAC.state_dict()", "keys": len(state),
            "weights_from": "tests/fixtures/fish-s1-tiny/codec.pth",
            "s1_keys_not_saved": sorted(result.unexpected_keys)}


def verify_checkpoint(out: Path) -> dict:
    """Load the checkpoint the way the reference does and check that every parameter comes from the files
    (fish loads with strict=False and swallows tokenizer errors, leaving semantic ids 0): the model's
    state_dict must be exactly the remapped shards, value for value, and the injected semantic range right."""
    from safetensors.torch import load_file

    from fish_speech.models.text2semantic.llama import DualARTransformer, _remap_fish_qwen3_omni_keys

    config = json.loads((out / "config.json").read_text())
    model = DualARTransformer.from_pretrained(str(out), load_weights=True)
    files = {}
    for shard in SHARDS:
        files.update(load_file(str(out / shard)))
    files = _remap_fish_qwen3_omni_keys(files)
    ours = model.state_dict()
    missing, unexpected = sorted(set(ours) - set(files)), sorted(set(files) - set(ours))
    different = sorted(k for k in set(ours) & set(files) if not torch.equal(ours[k], files[k]))
    if missing or unexpected or different:
        raise SystemExit(f"model does not load every key: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"different {different[:5]}")
    assert model.config.semantic_begin_id == config["semantic_start_token_id"], model.config.semantic_begin_id
    assert model.config.semantic_end_id == config["semantic_end_token_id"], model.config.semantic_end_id
    assert model.tokenizer.get_token_id("<|im_end|>") == config["eos_token_id"]
    assert model.config.vocab_size == config["text_config"]["vocab_size"]
    _, ignored = s2ref.load_codec(out)
    return {"model_keys": len(ours), "codec_keys_ignored_by_reference": ignored,
            "flattened_config": {k: v for k, v in sorted(vars(model.config).items())}}


# -----------------------------------------------------------------------------------------------------------
# Capturing the reference's internals
# -----------------------------------------------------------------------------------------------------------


class Recorder:
    """Wraps fish's module-level `generate` and `sample` and the model's `forward_generate_fast` while it lives;
    what they see goes to `self.current` (a dict per request), or nowhere when that is None. The wrappers only
    copy tensors."""

    def __init__(self, model):
        import fish_speech.models.text2semantic.inference as t2s

        self.t2s, self.model, self.current = t2s, model, None
        self.originals = {"generate": t2s.generate, "sample": t2s.sample}
        self.fast = model.forward_generate_fast
        t2s.generate, t2s.sample = self.generate, self.sample
        model.forward_generate_fast = self.forward_generate_fast

    def close(self) -> None:
        for name, fn in self.originals.items():
            setattr(self.t2s, name, fn)
        del self.model.forward_generate_fast  # back to the class's method

    def start(self) -> dict:
        self.current = {"batches": [], "samples": [], "fast_in": [], "fast_out": [], "sample_args": set()}
        return self.current

    def generate(self, **kwargs):
        rec = self.current
        if rec is not None:
            rec["samples"] = []  # per batch
        seq = self.originals["generate"](**kwargs)
        if rec is not None:
            prompt = kwargs["prompt"]
            rec["batches"].append({
                "prompt": prompt.detach().cpu().numpy().astype(np.int64),
                "frames": seq[:, prompt.shape[1]:].detach().cpu().numpy().astype(np.int64),
                "audio_masks_none": kwargs["audio_masks"] is None, "audio_parts_none": kwargs["audio_parts"] is None,
                "samples": rec["samples"],
                "max_new_tokens": kwargs["max_new_tokens"],
            })
        return seq

    def sample(self, logits, temperature, top_p, top_k):
        rec = self.current
        idx, probs = self.originals["sample"](logits, temperature=temperature, top_p=top_p, top_k=top_k)
        if rec is not None:
            slow = logits.shape[-1] == self.model.config.vocab_size
            rec["samples"].append((slow, int(idx), logits[0, -1].detach().clone().float() if slow else None))
            rec["sample_args"].add((str(temperature.dtype), float(temperature), float(top_p), top_k))
        return idx, probs

    def forward_generate_fast(self, x, input_pos=None):
        out = self.fast(x, input_pos)
        rec = self.current
        if rec is not None and len(rec["fast_out"]) < self.model.config.num_codebooks:
            rec["fast_in"].append(x.detach().clone().float().reshape(-1))
            rec["fast_out"].append(out.detach().clone().float().reshape(-1))
        return out


def run_request(engine, spec: dict, folder: Path) -> dict:
    """One request through TTSInferenceEngine.inference: the codes each decoder call got and the final audio.
    The codec gets a copy of the codes: fish 2.0's DAC decode clamps its argument in place, and on CPU that tensor
    is also the one the generation thread keeps in its conversation (`codes.cpu()` is a no-op there), so without
    the copy the next batch's prompt would race with the codec. On CUDA `codes.cpu()` copies, as here."""
    seen = []
    decode = engine.decode_vq_tokens

    def keep(codes):
        seen.append(codes.detach().cpu().numpy().astype(np.int64))
        return decode(codes.clone())

    engine.decode_vq_tokens = keep
    try:
        finals = [r for r in engine.inference(serve_request(spec, folder)) if r.code in ("final", "error")]
    finally:
        del engine.decode_vq_tokens
    assert len(finals) == 1 and finals[0].code == "final", finals
    rate, audio = finals[0].audio
    assert rate == SAMPLE_RATE
    return {"codes": seen, "audio": np.asarray(audio, dtype=np.float32)}


def teacher_forced(model, prompt: np.ndarray, every_position: bool):
    """(logits, hidden) of forward_generate over a whole prompt, run as the prefill runs it (input_pos 0..L-1, the
    default SDPA backend): every position ([L, vocab], [L, fast_dim]; return_all) or, as the prefill itself, only
    the last one ([vocab], [fast_dim]). The two differ in the last bits of the last row: the output projection is
    then a matrix-vector product, whose float sums run in another order."""
    from fish_speech.models.text2semantic.llama import BaseTransformer

    with torch.inference_mode():
        x = torch.from_numpy(prompt)[None]
        result = BaseTransformer.forward_generate(model, x, input_pos=torch.arange(x.shape[-1]),
                                                  return_all=every_position)
        hidden = model.fast_project_in(result.hidden_states)
    if every_position:
        return result.logits[0].float().numpy(), hidden[0].float().numpy()
    return result.logits[0, -1].float().numpy(), hidden[0, -1].float().numpy()


LORA_MERGED = "lora-merged"
LORA_SEED = 11
LORA_LOGIT_ROWS = 8  # the last prompt positions whose teacher-forced logits are kept (size)


def write_lora_merged(out: Path) -> dict:
    """`lora-merged/`: what fish-speech's own LoRA-merge tool (`tools/llama/merge_lora.py`, its `merge` command
    with the `r_8_alpha_16` config) writes from this checkpoint and a LoRA of seeded random weights (saved as
    training saves one: a Lightning "state_dict" with "model."-prefixed `lora_*` keys): `config.json` (fish's flat
    `dual_ar` args), `model.pth` (its own key names) and the tokenizer files, but no codec; and `logits.npz`, the
    merged model's teacher-forced logits over the `single` request's prompt, loaded back by the reference as its
    `init_model` loads a checkpoint (float32, caches set up)."""
    import tempfile

    from fish_speech.models.text2semantic.llama import BaseTransformer
    from fish_speech.models.text2semantic.lora import LoraConfig
    from tools.llama import merge_lora

    wrapped = BaseTransformer.from_pretrained(str(out), load_weights=True,
                                              lora_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.01))
    gen = torch.Generator().manual_seed(LORA_SEED)
    lora = {f"model.{k}": (torch.randn(v.shape, generator=gen) * 0.05).to(v.dtype)
            for k, v in wrapped.state_dict().items() if "lora" in k}
    target = out / LORA_MERGED
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"state_dict": lora}, Path(tmp) / "lora.ckpt")
        merge_lora.merge.callback(lora_config="r_8_alpha_16", base_weight=str(out),
                                  lora_weight=str(Path(tmp) / "lora.ckpt"), output=str(target))
    merged = BaseTransformer.from_pretrained(str(target), load_weights=True).to(torch.float32).eval()
    merged.setup_caches(max_batch_size=1, max_seq_len=merged.config.max_seq_len, dtype=torch.float32)  # as init_model
    prompt = np.load(out / "gen_single.npz")["prompt"]
    logits, _ = teacher_forced(merged, prompt, every_position=True)
    positions = np.arange(prompt.shape[-1] - LORA_LOGIT_ROWS, prompt.shape[-1])
    np.savez(target / "logits.npz", prompt=prompt, positions=positions, logits=logits[positions])
    written = sorted(p.name for p in target.iterdir())
    # The tool copies the tokenizer files unchanged; the fixture keeps one copy (the tests put them back).
    same = [name for name in written if (out / name).is_file() and (out / name).read_bytes() == (target / name).read_bytes()]
    for name in same:
        (target / name).unlink()
    return {"lora_seed": LORA_SEED, "lora_tensors": len(lora), "files_written": written,
            "left_out_as_identical_to_the_checkpoints": same}


def codec_goldens(engine, out: Path) -> dict:
    """codec.npz: each clip as the engine loads it, its codes as the engine encodes it, and their decode."""
    from fish_speech.models.text2semantic.inference import GenerateResponse

    arrays, summary = {}, {}
    for key, (wav, _, _) in CLIPS.items():
        suffix = "" if key == "a" else f"_{key}"
        clip = (out / wav).read_bytes()
        with torch.inference_mode():  # as inside TTSInferenceEngine.inference
            codes = engine.encode_reference(reference_audio=clip, enable_reference_audio=True)
            audio = engine.load_audio(clip, SAMPLE_RATE).astype(np.float32)
            decoded = engine.get_audio_segment(GenerateResponse(action="sample", codes=codes.clone()))
        arrays.update({f"audio{suffix}": audio, f"codes{suffix}": codes.numpy().astype(np.int64),
                       f"decoded{suffix}": decoded.astype(np.float32)})
        summary[wav] = {"audio_samples": int(audio.shape[0]), "codes_shape": list(codes.shape),
                        "decoded_samples": int(decoded.shape[0])}
    np.savez(out / "codec.npz", **arrays)
    return summary


def golden_run(out: Path) -> dict:
    engine, codec, model = s2ref.load_engine(out, "cpu", torch.float32, False)
    config = json.loads((out / "config.json").read_text())
    im_end, semantic_begin = config["eos_token_id"], config["semantic_start_token_id"]
    summary = {"sample_rate": SAMPLE_RATE, "codec": codec_goldens(engine, out)}
    recorder = Recorder(model)
    requests = []
    try:
        for spec in request_specs():
            rec = recorder.start()
            result = run_request(engine, spec, out)
            recorder.current = None
            batches = rec["batches"]
            assert len(batches) == len(result["codes"]), (len(batches), len(result["codes"]))
            arrays, batch_info = {}, []
            for b, batch in enumerate(batches):
                suffix = "" if b == 0 else f"_{b}"
                frames, prompt, codes = batch["frames"], batch["prompt"], result["codes"][b]
                assert np.array_equal(frames[1:, :-1], codes), "decoder codes != generated frames but the last"
                arrays.update({f"prompt{suffix}": prompt, f"frames{suffix}": frames, f"codes{suffix}": codes})
                if b > 0:  # the conversation carries the previous batch's codes as they were generated
                    carried = batches[b - 1]["frames"][1:, :-1]
                    width = carried.shape[1]
                    assert any(np.array_equal(prompt[1:, i:i + width], carried)
                               for i in range(prompt.shape[1] - width + 1)), "previous codes not in the prompt"
                slow = [s for s in batch["samples"] if s[0]]
                n = frames.shape[1]
                assert len(slow) == 2 * n and len(batch["samples"]) == 11 * n, (len(slow), n)
                normal, fallback = [s[1] for s in slow[0::2]], [s[1] for s in slow[1::2]]
                ras = [t for t in range(n) if frames[0, t] != normal[t]]
                assert all(frames[0, t] == fallback[t] for t in ras)
                if b == 0:
                    logits, hidden = teacher_forced(model, prompt, every_position=True)
                    prefill_logits, prefill_hidden = teacher_forced(model, prompt, every_position=False)
                    # The last-position-only pass is the prefill: same logits, same fast-stack input.
                    allowed = torch.isfinite(slow[0][2])
                    assert torch.equal(slow[0][2][allowed], torch.from_numpy(prefill_logits)[allowed]), \
                        "teacher-forced != prefill logits"
                    assert torch.equal(rec["fast_in"][0], torch.from_numpy(prefill_hidden)), "fast input != hidden"
                    arrays.update(hidden=hidden, prefill_logits=prefill_logits, prefill_hidden=prefill_hidden,
                                  fast_logits=torch.stack(rec["fast_out"]).numpy())
                    if spec["name"] in FULL_LOGITS:
                        arrays["logits"] = logits
                    tf_gap = {"logits": float(np.abs(logits[-1] - prefill_logits).max()),
                              "hidden": float(np.abs(hidden[-1] - prefill_hidden).max())}
                batch_info.append({
                    "prompt_shape": list(prompt.shape), "frames": int(n), "codes_shape": list(codes.shape),
                    "stopped_by_im_end": bool(frames[0, -1] == im_end),
                    "ras_fallback_frames": ras,
                    "non_semantic_slow_tokens": int((frames[0] < semantic_begin).sum()),
                    "residual_codes_ge_1024": int((codes[1:] >= 1024).sum()),
                    "audio_masks_none": batch["audio_masks_none"], "audio_parts_none": batch["audio_parts_none"],
                })
            batch_info[0]["last_row_teacher_forced_vs_prefill_max_abs_diff"] = tf_gap
            arrays["audio"] = result["audio"]
            np.savez(out / spec["file"], **arrays)
            requests.append({**spec, "batches": batch_info, "audio_samples": int(result["audio"].shape[0]),
                             "observed_sample_calls": [
                                 {"param_dtype": d, "temperature": t, "top_p": p, "top_k": k}
                                 for d, t, p, k in sorted(rec["sample_args"])]})
    finally:
        recorder.close()
    summary.update(im_end_id=im_end, semantic_begin_id=semantic_begin, requests=requests, torch=torch.__version__,
                   torch_threads=torch.get_num_threads())
    return summary


# -----------------------------------------------------------------------------------------------------------
# Determinism
# -----------------------------------------------------------------------------------------------------------


def replay(checkpoint: Path, names: list[str], out: Path) -> None:
    """The named requests, in order, in this (fresh) process, with no wrapper but the decoder-call one."""
    engine, _, _ = s2ref.load_engine(checkpoint, "cpu", torch.float32, False)
    specs = {s["name"]: s for s in request_specs()}
    arrays = {}
    for name in names:
        result = run_request(engine, specs[name], checkpoint)
        for b, codes in enumerate(result["codes"]):
            arrays[f"{name}_codes_{b}"] = codes
        arrays[f"{name}_audio"] = result["audio"]
    np.savez(out, **arrays)


def run_replay(checkpoint: Path, names: list[str], threads: int, scratch: Path, label: str) -> dict:
    out = scratch / f"{label}.npz"
    cmd = [sys.executable, str(Path(__file__).resolve()), "replay", "--checkpoint", str(checkpoint),
           "--names", ",".join(names), "--out", str(out), "--threads", str(threads)]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode or not out.is_file():
        raise SystemExit(f"replay {label} failed:\n{proc.stderr[-3000:]}")
    return dict(np.load(out))


def compare(golden: dict, run: dict, name: str) -> dict:
    batches = sorted(k for k in golden if k.startswith("codes"))
    same = all(np.array_equal(run[f"{name}_codes_{b}"], golden["codes" if b == 0 else f"codes_{b}"])
               for b in range(len(batches))) and f"{name}_codes_{len(batches)}" not in run
    audio = run[f"{name}_audio"]
    diff = float(np.abs(audio - golden["audio"]).max()) if audio.shape == golden["audio"].shape else float("inf")
    return {"codes_identical": bool(same), "audio_max_abs_diff": diff}


def determinism(out: Path, scratch: Path) -> dict:
    specs = request_specs()
    names = [s["name"] for s in specs]
    golden = {s["name"]: dict(np.load(out / s["file"])) for s in specs}
    runs = {"fresh-process#1": run_replay(out, names, TORCH_THREADS, scratch, "fresh1"),
            "fresh-process#2": run_replay(out, names, TORCH_THREADS, scratch, "fresh2"),
            "fresh-process-reversed-order": run_replay(out, names[::-1], TORCH_THREADS, scratch, "reversed")}
    return {"runs": {label: {name: compare(golden[name], run, name) for name in names}
                     for label, run in runs.items()}}


# -----------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("build", "checkpoint"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--clip", type=Path, default=S1_FIXTURE / "reference.wav",
                       help="44.1 kHz mono PCM16 clip of CLIP_TEXT (default: the S1 fixture's)")
        p.add_argument("--skip-determinism", action="store_true")
    p = sub.add_parser("replay")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--names", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=TORCH_THREADS)
    args = ap.parse_args()

    torch.set_num_threads(getattr(args, "threads", TORCH_THREADS))
    if args.command == "replay":
        replay(args.checkpoint, args.names.split(","), args.out)
        sys.stdout.flush()
        os._exit(0)  # fish's generation thread blocks the interpreter's teardown

    out = args.out
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; regenerate.sh builds into a fresh folder")
    info = write_checkpoint(out, args.clip)
    info["verified"] = verify_checkpoint(out)
    print(f"checkpoint written to {out} and verified", file=sys.stderr)
    if args.command == "build":
        summary = golden_run(out)
        info["lora_merged"] = write_lora_merged(out)
        summary["checkpoint"] = info
        (out / "requests.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
        for r in summary["requests"]:
            print(f"  {r['name']}: " + "; ".join(
                f"prompt {b['prompt_shape']}, {b['frames']} frames, stop "
                f"{'im_end' if b['stopped_by_im_end'] else 'max_new_tokens'}, RAS {b['ras_fallback_frames']}"
                for b in r["batches"]), file=sys.stderr)
        if not args.skip_determinism:
            scratch = out.parent / f".{out.name}-replays"
            scratch.mkdir(exist_ok=True)
            try:
                report = determinism(out, scratch)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            report.update(torch=torch.__version__, torch_threads=TORCH_THREADS)
            (out / "determinism.json").write_text(json.dumps(report, indent=1) + "\n")
            print(json.dumps(report, indent=1), file=sys.stderr)
    else:
        (out / "checkpoint.json").write_text(json.dumps(info, indent=1) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
