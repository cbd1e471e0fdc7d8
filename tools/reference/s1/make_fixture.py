"""Write the fish-s1-tiny golden fixture with the reference implementation, PyPI fish-speech==0.1.0.

Run with the python of the venv that setup.sh builds (regenerate.sh does all of it in one command):

    VENV/bin/python make_fixture.py build   --out DIR [--clip reference.wav]   # checkpoint + goldens + checks
    VENV/bin/python make_fixture.py checkpoint --out DIR [--clip ...]           # the checkpoint files only
    VENV/bin/python make_fixture.py replay  --checkpoint DIR --names a,b --out X.npz [--threads N]

`build` does, in order:
1. the checkpoint, through fish's own classes: a 512-rank byte-level BPE trained on bpe_corpus.txt and fish's
   `FishTokenizer`; a `DualARTransformer` with random but non-degenerate weights, cast to bfloat16 and written by
   `save_pretrained` (config.json, model.pth, tokenizer.tiktoken, special_tokens.json); the codec, a `DAC`
   instantiated by hydra from codec_config.yaml, random weights, written as `torch.save(state_dict)`;
2. the golden outputs, running the engine exactly as a user of the package does (`launch_thread_safe_queue`,
   `load_model`, `TTSInferenceEngine.inference(ServeTTSRequest(...))`), with fish's module-level functions
   (`generate`, `logits_to_probs`, `multinomial_sample_one_no_sync`) and the engine's `decode_vq_tokens` wrapped at
   run time to record what passes through them. The installed package is never edited. The wrappers only clone
   tensors; the noise recorder draws the same noise from a saved RNG state and restores the state first;
3. the determinism checks: every request again in fresh processes without any wrapper (`replay`), alone twice,
   all in one process, and all in one process at one torch thread; plus an independent re-statement of the
   sampling rule fed with the recorded logits and noise. Results go to determinism.json.

Everything is float32 on CPU at 2 torch threads, compile=False. Rebuilding gives the same bytes (the weights come
from a seeded generator, the goldens from seeded requests).
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import fishref  # noqa: E402

TORCH_THREADS = 2
WEIGHT_SEED = 20250701
IM_END_GAIN = 1.6  # the <|im_end|> row of the slow output layer is scaled by this (see README)
OUTPUT_LOGIT_STD = 2.5  # slow / fast output layers give logits with about this std
DECODER_PRE_TANH_STD = 0.3  # the codec decoder's last conv is calibrated to this std before its tanh
NUM_MERGES = 256
CLIP_TEXT = "This is a short reference recording."
SAMPLE_RATE = 44100

MODEL_CONFIG = dict(
    model_type="dual_ar", vocab_size=4623, n_layer=2, n_head=4, dim=32, intermediate_size=96, n_local_heads=2,
    head_dim=16, rope_base=1e6, norm_eps=1e-6, max_seq_len=2560, dropout=0.0, tie_word_embeddings=False,
    attention_qkv_bias=False, attention_o_bias=False, attention_qk_norm=True, codebook_size=4096,
    num_codebooks=10, scale_codebook_embeddings=True, n_fast_layer=1, fast_dim=32, fast_n_head=4,
    fast_n_local_heads=2, fast_head_dim=8, fast_intermediate_size=96,
)

DEFAULTS = dict(chunk_length=200, streaming=False, use_memory_cache="off", normalize=True, format="wav")
REQUESTS = [  # name, text, with the reference clip, seed, temperature, top_p, repetition_penalty, max_new_tokens
    ("a", "Hello world, this is a test.", False, 1, 0.8, 0.8, 1.1, 32),
    ("b", "The quick brown fox jumps over the lazy dog.", True, 10, 0.8, 0.8, 1.1, 32),
    ("c", "Parity tests keep implementations honest.", True, 3, 0.5, 0.6, 1.3, 32),
    ("d", "On March 3rd, 2024, we measured 42 samples; the results (surprisingly!) matched: 98.6% agreement.",
     True, 4, 0.8, 0.8, 1.1, 32),
]
CAPTURED = ("a", "b")  # requests whose logits, noise and penalty windows are kept
NOISE_HEAD = 8


def request_specs() -> list[dict]:
    specs = []
    for name, text, with_ref, seed, temperature, top_p, penalty, max_new in REQUESTS:
        specs.append({
            "name": name, "file": f"gen_{name}.npz", "text": text,
            "reference": "reference.wav" if with_ref else None, "reference_text": CLIP_TEXT if with_ref else None,
            "seed": seed, "temperature": temperature, "top_p": top_p, "repetition_penalty": penalty,
            "max_new_tokens": max_new, **DEFAULTS,
        })
    return specs


def serve_request(spec: dict, folder: Path):
    fields = {k: spec[k] for k in ("text", "seed", "temperature", "top_p", "repetition_penalty",
                                   "max_new_tokens", *DEFAULTS)}
    if spec["reference"]:
        fields.update(reference_audio=str(folder / spec["reference"]), reference_text=spec["reference_text"])
    return fishref.tts_request(fields)


def bf16(value: float) -> float:
    return float(torch.tensor(float(torch.tensor(value, dtype=torch.float32)), dtype=torch.bfloat16))


# -----------------------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE trained here, loaded through fish's FishTokenizer
# -----------------------------------------------------------------------------------------------------------


def train_bpe(text: str, merges: int) -> list[bytes]:
    """The mergeable tokens in rank order: the 256 single bytes, then `merges` merges learnt from `text`.

    Text is cut into pieces with fish's own pre-tokenisation pattern; each round merges the most frequent adjacent
    pair inside pieces (ties: the lexicographically smallest pair). A pair whose concatenation is already a token
    is merged without a new rank."""
    import regex

    from fish_speech.tokenizer import FISH_TIKTOKEN_PATTERN

    # finditer, not findall: the pattern's `\s+(\?!\S)` branch is a capturing group (see the README's quirks).
    counts = collections.Counter(m.group(0) for m in regex.finditer(FISH_TIKTOKEN_PATTERN, text))
    words = {piece: [bytes([b]) for b in piece.encode()] for piece in counts}
    tokens = [bytes([b]) for b in range(256)]
    known = set(tokens)
    while len(tokens) < 256 + merges:
        pairs: collections.Counter = collections.Counter()
        for piece, parts in words.items():
            for a, b in zip(parts, parts[1:]):
                pairs[(a, b)] += counts[piece]
        if not pairs:
            raise SystemExit("the BPE corpus is too small for the requested merges")
        best = max(pairs.values())
        a, b = min(p for p, n in pairs.items() if n == best)
        joined = a + b
        if joined not in known:
            tokens.append(joined)
            known.add(joined)
        for piece, parts in words.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(joined)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            words[piece] = out
    return tokens


def make_tokenizer(folder: Path):
    from fish_speech.tokenizer import ALL_SPECIAL_TOKENS, SEMANTIC_TOKEN_TEMPLATE, FishTokenizer

    tokens = train_bpe((HERE / "bpe_corpus.txt").read_text(), NUM_MERGES)
    path = folder / "tokenizer.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    # fish 0.1.0's 15 control tokens, then 4096 semantic tokens (its own list stops at 1024).
    control = [t for t in ALL_SPECIAL_TOKENS if not t.startswith("<|semantic:")]
    specials = control + [SEMANTIC_TOKEN_TEMPLATE.format(i=i) for i in range(MODEL_CONFIG["codebook_size"])]
    return FishTokenizer(str(path), specials)


# -----------------------------------------------------------------------------------------------------------
# Random weights
# -----------------------------------------------------------------------------------------------------------


def uniform(shape, low, high, gen) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen)


def normal(shape, std, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def nonzero_bias(shape, gen) -> torch.Tensor:
    """Biases of magnitude 0.02..0.1 with random signs: never zero, never dominant."""
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    return sign * uniform(shape, 0.02, 0.1, gen)


def init_model_weights(model, seed: int, im_end_id: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):  # norm, fast_norm, attention_norm, ffn_norm, q_norm, k_norm
                p.copy_(uniform(p.shape, 0.7, 1.3, gen))
            elif leaf in ("embeddings", "codebook_embeddings", "fast_embeddings"):
                p.copy_(normal(p.shape, 1.0, gen))
            elif leaf in ("output", "fast_output"):
                p.copy_(normal(p.shape, OUTPUT_LOGIT_STD / math.sqrt(p.shape[1]), gen))
            elif p.ndim == 2:
                p.copy_(normal(p.shape, 1 / math.sqrt(p.shape[1]), gen))
            else:
                raise SystemExit(f"no init rule for model parameter {name} {tuple(p.shape)}")
        model.output.weight[im_end_id] *= IM_END_GAIN


def conv_fan_in(module) -> float:
    k = module.kernel_size[0]
    if isinstance(module, torch.nn.ConvTranspose1d):
        return module.in_channels * k / module.stride[0]
    return module.in_channels // module.groups * k


def init_codec_weights(codec, seed: int) -> None:
    """Random, non-degenerate codec weights (see README). Weight-normed convs get a direction v ~ N(0, 1/fan_in)
    and a gain g = |v| * U[0.8, 1.2], so the effective weight keeps the variance of v."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(codec.named_modules())
    done = set()
    with torch.no_grad():
        for name, p in codec.named_parameters():
            if name in done:
                continue
            owner_name, leaf = name.rsplit(".", 1)
            owner = modules.get(owner_name)
            if leaf == "alpha":  # Snake1d
                p.copy_(uniform(p.shape, 0.5, 1.5, gen))
            elif leaf == "gamma":  # LayerScale and ConvNeXt gammas
                p.copy_(uniform(p.shape, 0.2, 0.5, gen))
            elif leaf == "bias":
                p.copy_(nonzero_bias(p.shape, gen))
            elif leaf == "weight" and isinstance(owner, torch.nn.LayerNorm) or name.endswith("norm.weight"):
                p.copy_(uniform(p.shape, 0.7, 1.3, gen))
            elif name.endswith("codebook.weight"):
                p.copy_(normal(p.shape, 1.0, gen))
            elif leaf in ("original0", "original1", "weight_g", "weight_v"):
                if leaf in ("original0", "original1"):  # torch parametrizations
                    conv_name = owner_name.rsplit(".parametrizations", 1)[0]
                    g_name, v_name = f"{owner_name}.original0", f"{owner_name}.original1"
                else:  # legacy torch.nn.utils.weight_norm
                    conv_name = owner_name
                    g_name, v_name = f"{owner_name}.weight_g", f"{owner_name}.weight_v"
                params = dict(codec.named_parameters())
                g, v = params[g_name], params[v_name]
                v.copy_(normal(v.shape, 1 / math.sqrt(conv_fan_in(modules[conv_name])), gen))
                norm = v.flatten(1).norm(dim=1).view(g.shape)
                g.copy_(norm * uniform(g.shape, 0.8, 1.2, gen))
                done.update((g_name, v_name))
            elif leaf == "weight" and isinstance(owner, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
                p.copy_(normal(p.shape, 1 / math.sqrt(conv_fan_in(owner)), gen))
            elif leaf == "weight" and isinstance(owner, torch.nn.Linear):
                p.copy_(normal(p.shape, 1 / math.sqrt(p.shape[1]), gen))
            else:
                raise SystemExit(f"no init rule for codec parameter {name} {tuple(p.shape)}")
            done.add(name)


def calibrate_decoder_gain(codec, audio: np.ndarray) -> float:
    """Scale the weight-norm gain of the decoder's last conv so that, on the clip's own codes, the signal going
    into the final tanh has std DECODER_PRE_TANH_STD (out of saturation). Returns the factor applied."""
    last = [m for m in codec.decoder.model if isinstance(m, torch.nn.Module) and hasattr(m, "conv")][-1]
    seen = []
    hook = last.register_forward_hook(lambda module, inputs, output: seen.append(output.detach()))
    try:
        with torch.no_grad():
            x = torch.from_numpy(audio)[None, None]
            codes = codec.encode(x, torch.tensor([x.shape[-1]]))[0]
            codec.decode(codes, torch.tensor([codes.shape[-1]]))
    finally:
        hook.remove()
    bias = last.conv.bias.detach().view(1, -1, 1)
    std = float((seen[-1] - bias).std())
    factor = DECODER_PRE_TANH_STD / std
    with torch.no_grad():
        last.conv.parametrizations.weight.original0.mul_(factor)
    return factor


# -----------------------------------------------------------------------------------------------------------
# The checkpoint
# -----------------------------------------------------------------------------------------------------------


def make_clip(out: Path, clip: Path | None) -> None:
    """reference.wav / reference.txt: copied from --clip, or spoken by espeak-ng and converted by sox."""
    if clip is not None:
        if clip.resolve() != (out / "reference.wav").resolve():
            shutil.copyfile(clip, out / "reference.wav")
    else:
        if not (shutil.which("espeak-ng") and shutil.which("sox")):
            raise SystemExit("no --clip given and espeak-ng / sox are not installed "
                             "(apt-get install -y espeak-ng sox)")
        raw = out / "espeak.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-p", "50", "-w", str(raw), CLIP_TEXT], check=True)
        subprocess.run(["sox", "-R", "-D", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", "-e",
                        "signed-integer", str(out / "reference.wav")], check=True)
        raw.unlink()
    (out / "reference.txt").write_text(CLIP_TEXT + "\n")


def clip_as_fish_loads_it(path: Path) -> np.ndarray:
    import torchaudio

    wave, rate = torchaudio.load(path)
    assert rate == SAMPLE_RATE, f"{path}: {rate} Hz, expected {SAMPLE_RATE}"
    return wave.mean(dim=0).numpy() if wave.shape[0] > 1 else wave[0].numpy()


def write_checkpoint(out: Path, clip: Path | None) -> dict:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import fish_speech.models.dac.inference  # noqa: F401  (registers the "eval" resolver)
    from fish_speech.models.text2semantic.llama import DualARModelArgs, DualARTransformer

    out.mkdir(parents=True, exist_ok=True)
    make_clip(out, clip)

    tokenizer = make_tokenizer(out)
    config = DualARModelArgs(**MODEL_CONFIG)
    assert config.vocab_size == len(tokenizer.tkt_model._mergeable_ranks) + tokenizer.num_special_tokens
    im_end_id = tokenizer.get_token_id("<|im_end|>")
    model = DualARTransformer(config, tokenizer=tokenizer)
    init_model_weights(model, WEIGHT_SEED, im_end_id)
    model.to(torch.bfloat16).save_pretrained(out)  # config.json, model.pth, tokenizer.tiktoken, special_tokens.json

    shutil.copyfile(HERE / "codec_config.yaml", out / "codec_config.yaml")
    package_configs = Path(fish_speech.models.dac.inference.__file__).parents[2] / "configs"
    shutil.copyfile(package_configs / "modded_dac_vq.yaml", out / "reference_modded_dac_vq.yaml")
    codec = instantiate(OmegaConf.load(out / "codec_config.yaml")).eval()
    init_codec_weights(codec, WEIGHT_SEED + 1)
    gain = calibrate_decoder_gain(codec, clip_as_fish_loads_it(out / "reference.wav"))
    torch.save(codec.state_dict(), out / "codec.pth")
    return {"weight_seed": WEIGHT_SEED, "im_end_gain": IM_END_GAIN, "decoder_gain_factor": gain}


# -----------------------------------------------------------------------------------------------------------
# Capturing the reference's internals
# -----------------------------------------------------------------------------------------------------------


class Recorder:
    """Wraps fish's module-level sampling functions and `generate` for the lifetime of the object; what they see
    goes to `self.current` (a dict per request), or nowhere when it is None."""

    def __init__(self, vocab_size: int):
        import fish_speech.models.text2semantic.inference as t2s

        self.t2s, self.vocab_size, self.current = t2s, vocab_size, None
        self.originals = {n: getattr(t2s, n) for n in ("logits_to_probs", "multinomial_sample_one_no_sync",
                                                       "generate")}
        t2s.logits_to_probs = self.logits_to_probs
        t2s.multinomial_sample_one_no_sync = self.multinomial
        t2s.generate = self.generate

    def close(self) -> None:
        for name, fn in self.originals.items():
            setattr(self.t2s, name, fn)

    def start(self) -> dict:
        self.current = {"slow_logits": [], "fast_logits": [], "slow_noise": [], "fast_noise": [],
                        "slow_prev": [], "fast_prev": [], "param_dtypes": set(), "params": set()}
        return self.current

    def logits_to_probs(self, logits, temperature, top_p, repetition_penalty, previous_tokens=None):
        rec = self.current
        if rec is not None:
            slow = logits.shape[-1] == self.vocab_size
            rec["slow_logits" if slow else "fast_logits"].append(logits.detach().clone().float())
            width = 11 if slow else 16
            prev = (np.full(width, -1, np.int64) if previous_tokens is None
                    else previous_tokens.detach().long().cpu().numpy().reshape(-1))
            assert prev.shape == (width,), prev.shape
            rec["slow_prev" if slow else "fast_prev"].append(prev)
            rec["param_dtypes"].add(str(temperature.dtype))
            rec["params"].add((float(temperature), float(top_p), float(repetition_penalty)))
        return self.originals["logits_to_probs"](logits, temperature, top_p, repetition_penalty, previous_tokens)

    def multinomial(self, probs_sort):
        rec = self.current
        if rec is not None:
            state = torch.get_rng_state()
            q = torch.empty_like(probs_sort).exponential_(1)
            torch.set_rng_state(state)  # the reference draws the very same q next
            slow = probs_sort.shape[-1] == self.vocab_size
            rec["slow_noise" if slow else "fast_noise"].append(q[..., :NOISE_HEAD].clone().float().numpy())
        return self.originals["multinomial_sample_one_no_sync"](probs_sort)

    def generate(self, **kwargs):
        seq = self.originals["generate"](**kwargs)
        if self.current is not None:
            prompt = kwargs["prompt"]
            self.current["prompt"] = prompt.detach().cpu().numpy().copy()
            self.current["generated"] = seq[:, prompt.shape[1]:].detach().cpu().numpy().copy()
        return seq


def run_request(engine, spec: dict, folder: Path) -> dict:
    """One request through TTSInferenceEngine.inference: the codes its decoder got and the final audio."""
    seen = []
    decode = engine.decode_vq_tokens

    def keep(codes):
        seen.append(codes.detach().cpu().numpy().copy())
        return decode(codes)

    engine.decode_vq_tokens = keep
    try:
        finals = [r for r in engine.inference(serve_request(spec, folder)) if r.code in ("final", "error")]
    finally:
        engine.decode_vq_tokens = decode
    assert len(finals) == 1 and finals[0].code == "final", finals
    rate, audio = finals[0].audio
    assert rate == SAMPLE_RATE and len(seen) == 1
    return {"codes": seen[0], "audio": np.asarray(audio, dtype=np.float32)}


def code_margins_recorder():
    """Wraps dac's VectorQuantize.decode_latents (class level) to record, per decision, best minus second-best of
    the negated distance the reference ranks codebook entries by. Returns (records, restore)."""
    import torch.nn.functional as F
    from dac.nn.quantize import VectorQuantize

    original = VectorQuantize.decode_latents
    records = []

    def decode_latents(self, latents):
        z_q, indices = original(self, latents)
        enc = F.normalize(latents.detach().transpose(1, 2).reshape(-1, latents.shape[1]))
        book = F.normalize(self.codebook.weight.detach())
        score = -(enc.pow(2).sum(1, keepdim=True) - 2 * enc @ book.t() + book.pow(2).sum(1, keepdim=True).t())
        top = score.topk(2, dim=1)
        assert torch.equal(top.indices[:, 0].view_as(indices), indices), "margin recorder disagrees with dac"
        records.append((top.values[:, 0] - top.values[:, 1]).view_as(indices)[0].numpy())
        return z_q, indices

    VectorQuantize.decode_latents = decode_latents
    return records, lambda: setattr(VectorQuantize, "decode_latents", original)


def golden_run(out: Path) -> dict:
    from fish_speech.models.text2semantic.inference import GenerateResponse

    engine, codec = fishref.load_engine(out, "cpu", torch.float32, False)
    tokenizer_json = json.loads((out / "special_tokens.json").read_text())
    im_end, semantic_begin = tokenizer_json["<|im_end|>"], tokenizer_json["<|semantic:0|>"]
    summary = {"set": "A", "sample_rate": SAMPLE_RATE}

    # The codec: the clip as the engine loads and encodes it, and the decode of those codes.
    clip_bytes = (out / "reference.wav").read_bytes()
    margins, restore = code_margins_recorder()
    with torch.inference_mode():  # as inside TTSInferenceEngine.inference, which encodes and decodes the same way
        try:
            codes = engine.encode_reference(reference_audio=clip_bytes, enable_reference_audio=True)
        finally:
            restore()
        audio = engine.load_audio(clip_bytes, SAMPLE_RATE).astype(np.float32)
        decoded = engine.get_audio_segment(GenerateResponse(action="sample", codes=codes))
    code_margins = np.stack(margins).astype(np.float32)
    np.savez(out / "codec.npz", audio=audio, codes=codes.numpy().astype(np.int64),
             decoded=decoded.astype(np.float32), code_margins=code_margins)
    summary["codec"] = {"audio_samples": int(audio.shape[0]), "codes_shape": list(codes.shape),
                        "codes_dtype": "int64", "decoded_samples": int(decoded.shape[0]),
                        "min_code_margin": float(code_margins.min())}

    recorder = Recorder(MODEL_CONFIG["vocab_size"])
    requests, recorded = [], {}
    t0 = time.perf_counter()
    try:
        for spec in request_specs():
            rec = recorder.start()
            result = run_request(engine, spec, out)
            recorder.current = None
            gen, prompt = rec["generated"].astype(np.int32), rec["prompt"].astype(np.int32)
            n = gen.shape[1]
            assert np.array_equal(gen[1:, :-1], result["codes"]), "decoder codes != generated frames but the last"
            arrays = {"prompt": prompt, "codes": result["codes"].astype(np.int32), "generated": gen,
                      "audio": result["audio"]}
            captured = spec["name"] in CAPTURED
            assert len(rec["slow_logits"]) == n and len(rec["fast_logits"]) == 9 * n
            internals = dict(
                slow_logits=torch.stack(rec["slow_logits"]).numpy(),
                fast_logits=torch.stack(rec["fast_logits"]).view(n, 9, -1).numpy(),
                slow_noise_head=np.stack(rec["slow_noise"]).astype(np.float32),
                fast_noise_head=np.stack(rec["fast_noise"]).reshape(n, 9, NOISE_HEAD).astype(np.float32),
                slow_prev_ids=np.stack(rec["slow_prev"]).astype(np.int64),
                fast_prev_ids=np.stack(rec["fast_prev"]).reshape(n, 9, 16).astype(np.int64),
            )
            # Every request is recorded; only the CAPTURED ones keep their internals in the fixture (size).
            recorded[spec["name"]] = {**arrays, **internals}
            if captured:
                arrays.update(internals)
            np.savez(out / spec["file"], **arrays)
            [params] = rec["params"]
            effective = {"temperature": bf16(spec["temperature"]), "top_p": bf16(spec["top_p"]),
                         "repetition_penalty": bf16(spec["repetition_penalty"])}
            assert params == tuple(effective.values()), (params, effective)
            slow = gen[0]
            entry = {
                **spec, "effective_bf16": effective, "sample_rate": SAMPLE_RATE,
                "prompt_shape": list(prompt.shape), "generated_frames": int(n),
                "codes_shape": list(arrays["codes"].shape), "audio_samples": int(result["audio"].shape[0]),
                "stopped_by_im_end": bool(slow[-1] == im_end), "im_end_id": im_end,
                "semantic_begin_id": semantic_begin,
                "non_semantic_slow_tokens": int((slow < semantic_begin).sum()),
                "non_semantic_slow_tokens_before_last": int((slow[:-1] < semantic_begin).sum()),
                "captured_internals": captured,
            }
            [entry["observed_sampling_param_dtype"]] = rec["param_dtypes"]
            requests.append(entry)
    finally:
        recorder.close()
    summary.update(requests=requests, torch=torch.__version__, torch_threads=torch.get_num_threads(),
                   seconds=round(time.perf_counter() - t0, 1))
    return summary, recorded


# -----------------------------------------------------------------------------------------------------------
# Determinism and self-consistency
# -----------------------------------------------------------------------------------------------------------


def replay(checkpoint: Path, names: list[str], out: Path) -> None:
    """The named requests, in order, in this (fresh) process, with no wrapper but the engine's decoder call."""
    engine, _ = fishref.load_engine(checkpoint, "cpu", torch.float32, False)
    specs = {s["name"]: s for s in request_specs()}
    arrays = {}
    for name in names:
        result = run_request(engine, specs[name], checkpoint)
        arrays[f"{name}_codes"], arrays[f"{name}_audio"] = result["codes"], result["audio"]
    np.savez(out, **arrays)


def run_replay(checkpoint: Path, names: list[str], threads: int, scratch: Path, label: str) -> dict:
    out = scratch / f"{label}.npz"
    cmd = [sys.executable, str(Path(__file__).resolve()), "replay", "--checkpoint", str(checkpoint),
           "--names", ",".join(names), "--out", str(out), "--threads", str(threads)]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode or not out.is_file():
        raise SystemExit(f"replay {label} failed:\n{proc.stderr[-3000:]}")
    return dict(np.load(out))


def rederive(logits, prev, params, q):
    """An independent statement of the reference's sampling rule: the id it picks, how many ids the top-p cut
    keeps, the sorted cumulative probabilities, and the picks had the cut kept one id more or one fewer."""
    temperature, top_p, penalty = params
    x = logits.clone()
    if prev is not None:
        ids = torch.from_numpy(np.unique(prev))
        vals = x[ids]
        x[ids] = torch.where(vals < 0, vals * penalty, vals / penalty)
    order = torch.argsort(x, descending=True, stable=True)
    cum = torch.cumsum(torch.softmax(x[order], dim=-1), dim=-1)
    kept = max(1, int((cum <= top_p).sum()))

    def pick(k):
        keep = torch.zeros_like(x, dtype=torch.bool)
        keep[order[:k]] = True
        probs = torch.softmax(torch.where(keep, x, float("-inf")) / max(temperature, 1e-5), dim=-1)
        score = probs / q
        top = torch.topk(score, 2)
        gap = float((top.values[0] - top.values[1]) / top.values[0]) if k > 1 else 1.0
        return int(torch.argmax(score)), gap

    chosen, gap = pick(kept)
    more = pick(min(kept + 1, x.numel()))[0]
    fewer = pick(max(kept - 1, 1))[0]
    return chosen, kept, cum, gap, more, fewer


def self_consistency(g: dict, spec: dict, vocab: int) -> dict:
    """Re-derive every sampled id of a request from its recorded logits, penalty windows rebuilt from the
    generated frames, and noise re-drawn from the seed; plus how close the decisions came to flipping."""
    params = (bf16(spec["temperature"]), bf16(spec["top_p"]), bf16(spec["repetition_penalty"]))
    gen = torch.Generator().manual_seed(spec["seed"])
    generated = g["generated"]
    n = generated.shape[1]
    noise_ok = windows_ok = tokens_ok = True
    gaps, sensitive, kept_slow, kept_fast = [], [], [], []
    history = np.zeros((11, max(n, 16)), np.int64)
    for t in range(n):
        # The window the loop would use at this frame, rebuilt from the generated frames.
        if t == 0:
            slow_prev = fast_prev = None
        else:
            i = t - 1
            window = history[:, :16] if i < 16 else history[:, i - 16:i]
            slow_prev, fast_prev = window[:, 0], window[2:]
            windows_ok &= np.array_equal(slow_prev, g["slow_prev_ids"][t])
            windows_ok &= np.array_equal(fast_prev, g["fast_prev_ids"][t])
        q = torch.empty(vocab).exponential_(1, generator=gen)
        noise_ok &= np.array_equal(q[:NOISE_HEAD].numpy(), g["slow_noise_head"][t])
        draws = [(torch.from_numpy(g["slow_logits"][t]), slow_prev, q, int(generated[0, t]))]
        for k in range(9):
            qk = torch.empty(1024).exponential_(1, generator=gen)
            noise_ok &= np.array_equal(qk[:NOISE_HEAD].numpy(), g["fast_noise_head"][t, k])
            draws.append((torch.from_numpy(g["fast_logits"][t, k]), None if fast_prev is None else fast_prev[k],
                          qk, int(generated[k + 2, t])))
        for j, (logits, prev, noise, expected) in enumerate(draws):
            chosen, kept, cum, gap, more, fewer = rederive(logits, prev, params, noise)
            (kept_fast if j else kept_slow).append(kept)
            tokens_ok &= chosen == expected
            gaps.append(gap)
            if more != chosen or fewer != chosen:
                sensitive.append(min(abs(float(cum[kept - 1]) - params[1]),
                                     abs(float(cum[min(kept, len(cum) - 1)]) - params[1])))
        if t >= 1:
            history[:, t - 1] = generated[:, t]
    return {"noise_replay": bool(noise_ok), "penalty_windows": bool(windows_ok), "tokens_rederived": bool(tokens_ok),
            "smallest_relative_gap": float(min(gaps)), "top_p_sensitive_decisions": len(sensitive),
            "closest_top_p_distance": float(min(sensitive)) if sensitive else None,
            "median_ids_kept_by_top_p": {"slow": float(np.median(kept_slow)), "fast": float(np.median(kept_fast))}}


def compare(golden: dict, run: dict, name: str) -> dict:
    same_codes = np.array_equal(run[f"{name}_codes"], golden["codes"])
    diff = float(np.abs(run[f"{name}_audio"] - golden["audio"]).max()) if run[f"{name}_audio"].shape == \
        golden["audio"].shape else float("inf")
    return {"codes_identical": bool(same_codes), "audio_max_abs_diff": diff}


def determinism(out: Path, scratch: Path, recorded: dict) -> dict:
    specs = request_specs()
    names = [s["name"] for s in specs]
    golden = {s["name"]: dict(np.load(out / s["file"])) for s in specs}
    runs = {}
    for name in names:
        for i in (1, 2):
            runs.setdefault(f"fresh#{i}", {}).update(run_replay(out, [name], TORCH_THREADS, scratch,
                                                                f"fresh{i}-{name}"))
    runs["sequence"] = run_replay(out, names, TORCH_THREADS, scratch, "sequence")
    runs["sequence-1thread"] = run_replay(out, names, 1, scratch, "sequence-1thread")
    report = {"runs": {label: {name: compare(golden[name], run, name) for name in names}
                       for label, run in runs.items()}}
    report["self_consistency"] = {s["name"]: self_consistency(recorded[s["name"]], s, MODEL_CONFIG["vocab_size"])
                                  for s in specs}
    report["min_code_margin"] = float(np.load(out / "codec.npz")["code_margins"].min())
    return report


# -----------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("build", "checkpoint"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--clip", type=Path, help="44.1 kHz mono PCM16 clip of CLIP_TEXT (default: espeak-ng + sox)")
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
        os._exit(0)  # fish's generation thread aborts the interpreter's teardown

    out = args.out
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; regenerate.sh builds into a fresh folder")
    info = write_checkpoint(out, args.clip)
    print(f"checkpoint written to {out}: {info}", file=sys.stderr)
    if args.command == "build":
        summary, recorded = golden_run(out)
        summary["checkpoint"] = info
        (out / "requests.json").write_text(json.dumps(summary, indent=1) + "\n")
        for r in summary["requests"]:
            print(f"  {r['name']}: prompt {r['prompt_shape']}, {r['generated_frames']} frames, stop "
                  f"{'im_end' if r['stopped_by_im_end'] else 'max_new_tokens'}, non-semantic slow tokens "
                  f"{r['non_semantic_slow_tokens']}", file=sys.stderr)
        if args.skip_determinism:
            for spec in request_specs():
                print(spec["name"], self_consistency(recorded[spec["name"]], spec, MODEL_CONFIG["vocab_size"]),
                      file=sys.stderr)
        else:
            scratch = out.parent / f".{out.name}-replays"
            scratch.mkdir(exist_ok=True)
            try:
                report = determinism(out, scratch, recorded)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            report.update(torch=torch.__version__, torch_threads=TORCH_THREADS)
            (out / "determinism.json").write_text(json.dumps(report, indent=1) + "\n")
            print(json.dumps(report, indent=1), file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
