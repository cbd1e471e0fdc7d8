"""The Fish Speech S1 engine: loads a checkpoint once and turns requests into audio.

It owns the model, the codec and the tokenizer from `shoal.fish`, the batch scheduler that decodes every request's
rows together, a bounded cache of encoded reference clips, and a lock that serialises codec encodes.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import replace
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from shoal.audio import load_audio
from shoal.errors import BadRequest, Cancelled, EngineFailure, ShoalError
from shoal.fish.checkpoint import CODEC_CONFIG_FILE, check_checkpoint_dir, load_dual_ar
from shoal.layout import GENERATION_HEADROOM
from shoal.fish.codec import Codec, CodecConfig, DecodeStream, load_codec
from shoal.fish.dual_ar import DualARTransformer
from shoal.fish.prompt import build_prompt, check_prompt_length
from shoal.fish.quant import quantize_int8
from shoal.fish.runner import ModelRunner
from shoal.fish.sampling import SamplingParams
from shoal.fish.tokenizer import FishTokenizer
from shoal.text import split_text

from .base import Progress, Reference, Synthesis, SynthesisRequest
from .scheduler import BatchScheduler

PRECISIONS = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
# Left context for decoding codes longer than the codec's block in overlapping pieces, beyond its attention window:
# the causal convolutions' reach, in frames, with room to spare (the test measures the error).
STREAM_CONTEXT_MARGIN = 8
#: The largest streamed chunk, in frames (~3 s): chunks double from the first one up to this.
STREAM_MAX_FRAMES = 64


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu. An explicit device that is not available is a BadRequest."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise BadRequest(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadRequest("device cuda was asked for, but this torch build sees no CUDA GPU")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BadRequest("device mps was asked for, but it is not available")
    return dev


def check_quantize(quantize: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a `quantize` setting this device and precision cannot run: int8 weights are CPU kernels on float32
    activations (on a GPU, bfloat16 is the way to halve the weights)."""
    if quantize == "none":
        return
    if quantize != "int8":
        raise BadRequest(f"unknown quantize {quantize!r} (SHOAL_QUANTIZE): use none or int8")
    if device.type != "cpu":
        raise BadRequest(f"quantize=int8 (SHOAL_QUANTIZE) runs on the CPU only, not on {device.type}; "
                         "leave it at none (bfloat16 is the default on CUDA)")
    if dtype != torch.float32:
        raise BadRequest(f"quantize=int8 (SHOAL_QUANTIZE) needs precision float32, not {str(dtype)[6:]}")


def resolve_precision(precision: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on CUDA and float32 elsewhere (CPU bf16 matmuls are slow and lose parity)."""
    if isinstance(precision, torch.dtype):
        return precision
    if precision in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return PRECISIONS[str(precision).lower()]
    except KeyError:
        raise BadRequest(f"unknown precision {precision!r}: use auto, float32, bfloat16 or float16") from None


class FishEngine:
    """Text (plus optional reference clips) to audio with an S1 checkpoint."""

    name = "fish"
    supports_cloning = True

    def __init__(self, model: DualARTransformer, codec: Codec, tokenizer: FishTokenizer, *,
                 checkpoint_dir: Path | None = None, reference_cache_size: int = 16, max_batch_size: int = 4,
                 max_batch_tokens: int | None = None, stream_first_frames: int = 11, fault_injection: bool = False,
                 compile: bool = False, cuda_graphs: bool = False, max_reference_seconds: float | None = None):
        self.model = model
        self.codec = codec
        self.tokenizer = tokenizer
        self.checkpoint_dir = checkpoint_dir
        self.device = model.embeddings.weight.device
        self.precision = model.embeddings.weight.dtype
        self.sample_rate = codec.config.sample_rate
        self.frame_length = codec.config.frame_length
        self.reference_cache_size = reference_cache_size
        #: Inline reference clips longer than this are refused while decoding (a few KiB of FLAC can hold an
        #: hour of silence); None: audio.load_audio's own cap.
        self.max_reference_seconds = max_reference_seconds
        self._references: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._references_lock = threading.Lock()  # worker threads of concurrent requests share the cache
        self._lock = threading.Lock()
        #: How many times a reference clip went through the codec encoder (cache misses).
        self.encode_count = 0
        #: Frames through the codec decoder since start (left context included): with incremental streaming,
        #: about the frames generated.
        self.codec_frames = 0
        #: Inline reference clips found in (hits) or missing from (misses) the in-memory cache.
        self.reference_cache_hits = 0
        self.reference_cache_misses = 0
        #: Testing only: texts with a FAULT_MARKERS marker fail inside generation (see Settings.fault_injection).
        self.fault_injection = fault_injection
        self._codec_checksum: str | None = None
        #: Where compiled kernels are kept across restarts (load's compile_cache_dir, with compile only).
        self.compile_cache_dir: Path | None = None
        #: "int8" when the transformers' linear layers run with int8 weights (load's quantize), else "none".
        self.quantize = "none"
        self.runner = ModelRunner(model, max_batch_size, compile=compile, cuda_graphs=cuda_graphs)
        if compile:
            model.setup_caches(batch=max_batch_size)  # static: allocated once, before compiling
            self.runner.warm_up()
        self.scheduler = BatchScheduler(model, max_batch=max_batch_size, max_tokens=max_batch_tokens,
                                        runner=self.runner)
        #: Streaming: frames before the first chunk (11 is about 0.5 s) and the largest chunk. Past the codec's
        #: block, pieces are decoded with `stream_context` frames of left context (its attention window plus
        #: its convolutions' reach).
        self.stream_first_frames = max(1, stream_first_frames)
        self.stream_max_frames = STREAM_MAX_FRAMES
        window = codec.config.quantizer_transformer.window_size
        #: The most frames the codec decodes at once (its transformers' block size); longer codes go in pieces.
        self.decode_limit = codec.config.quantizer_transformer.block_size
        self.stream_context = min(window + STREAM_CONTEXT_MARGIN if window else self.decode_limit,
                                  self.decode_limit // 2)

    @classmethod
    def load(cls, checkpoint_dir: str | Path, device: str | torch.device | None = "auto",
             precision: str | torch.dtype | None = "auto", compile: bool = False,
             reference_cache_size: int = 16, max_batch_size: int = 4, max_batch_tokens: int | None = None,
             stream_first_frames: int = 11, fault_injection: bool = False, cuda_graphs: bool = False,
             compile_cache_dir: str | Path | None = None, max_reference_seconds: float | None = None,
             max_seq_len: int | None = None, quantize: str = "none") -> "FishEngine":
        """Load a checkpoint directory once. Raises CheckpointError naming a missing or mismatched file.

        `compile` runs the decode step through torch.compile (see shoal.fish.runner), `cuda_graphs` also
        captures it as CUDA graphs (CUDA only); `compile_cache_dir` keeps compiled kernels across restarts.
        `max_seq_len` caps the positions a request may take (prompt + generated) below the checkpoint's own, which
        shrinks the KV caches (the compiled path allocates them at full length). `quantize` "int8" runs the
        transformers' linear layers with int8 weights (`shoal.fish.quant`; CPU and float32 only)."""
        path = check_checkpoint_dir(checkpoint_dir)
        dev = resolve_device(device)
        if cuda_graphs and not (compile and dev.type == "cuda"):
            raise BadRequest("cuda_graphs needs compile=True and a CUDA device")
        cache_dir = Path(compile_cache_dir) if compile and compile_cache_dir is not None else None
        if cache_dir is not None:
            persist_compile_cache(cache_dir)
        dtype = resolve_precision(precision, dev)
        check_quantize(quantize, dev, dtype)
        tokenizer = FishTokenizer.from_dir(path)
        model = load_dual_ar(path, tokenizer, dev, dtype)
        if quantize == "int8":
            quantize_int8(model)
        if max_seq_len is not None:
            cap_seq_len(model, max_seq_len)
        codec_yaml = path / CODEC_CONFIG_FILE
        codec_config = CodecConfig.from_yaml(codec_yaml) if codec_yaml.is_file() else CodecConfig()
        # The codec stays float32: it is a small share of the time and bf16 audibly degrades decoding.
        codec = load_codec(path / "codec.pth", codec_config, device=dev, dtype=torch.float32)
        engine = cls(model, codec, tokenizer, checkpoint_dir=path, reference_cache_size=reference_cache_size,
                     max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                     stream_first_frames=stream_first_frames, fault_injection=fault_injection, compile=compile,
                     cuda_graphs=cuda_graphs, max_reference_seconds=max_reference_seconds)
        engine.compile_cache_dir = cache_dir
        engine.quantize = quantize
        return engine

    # -- references --------------------------------------------------------------------------------------------
    def encode_reference(self, reference: Reference) -> torch.Tensor:
        """Codes `[num_codebooks, F]` of a reference clip: its own `codes` if it carries them, else from a
        bounded LRU keyed by the clip's sha256, else from the codec encoder (counted in `encode_count`)."""
        if reference.codes is not None:
            return self._check_codes(reference.codes)
        data = reference.read_bytes()
        key = hashlib.sha256(data).hexdigest()
        if reference.cache:
            with self._references_lock:
                codes = self._references.get(key)
                if codes is not None:
                    self._references.move_to_end(key)
                    self.reference_cache_hits += 1
                    return codes
                self.reference_cache_misses += 1
        limit = {} if self.max_reference_seconds is None else {"max_seconds": self.max_reference_seconds}
        codes = torch.from_numpy(self.encode_audio(load_audio(data, target_sr=self.sample_rate, **limit)))
        if reference.cache and self.reference_cache_size > 0:
            with self._references_lock:
                self._references[key] = codes
                while len(self._references) > self.reference_cache_size:
                    self._references.popitem(last=False)
        return codes

    def encode_audio(self, audio: np.ndarray) -> np.ndarray:
        """Codec codes int64 `[num_codebooks, F]` of float32 mono audio at `sample_rate` (always encodes)."""
        with self._lock, torch.inference_mode():
            try:
                codes = self.codec.encode(torch.from_numpy(np.ascontiguousarray(audio, np.float32)).to(self.device))
            except ValueError as exc:  # longer than the codec's transformers take in one piece
                if "block_size" not in str(exc):
                    raise
                raise BadRequest(f"the reference clip is {len(audio) / self.sample_rate:.1f} s, longer than this "
                                 "checkpoint's codec encodes in one piece; use a shorter clip") from None
        self.encode_count += 1
        return codes.cpu().numpy().astype(np.int64)

    def _check_codes(self, codes) -> torch.Tensor:
        codes = torch.as_tensor(np.asarray(codes)).long()
        c = self.codec.config
        if codes.dim() != 2 or codes.shape[0] != c.num_codebooks or codes.shape[1] == 0:
            raise BadRequest(f"reference codes must be [{c.num_codebooks}, frames], got {tuple(codes.shape)}")
        limits = torch.tensor([c.semantic_codebook_size] + [c.codebook_size] * (c.num_codebooks - 1))
        if (codes < 0).any() or (codes >= limits[:, None]).any():
            raise BadRequest("reference codes are out of the codebooks' range")
        return codes

    @property
    def codec_checksum(self) -> str:
        """sha256 of the codec weights file: saved voices keep codes made with these exact weights."""
        if self._codec_checksum is None:
            digest = hashlib.sha256()
            with open(self.checkpoint_dir / "codec.pth", "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            self._codec_checksum = digest.hexdigest()
        return self._codec_checksum

    # -- synthesis ---------------------------------------------------------------------------------------------
    def synthesize(self, request: SynthesisRequest, progress: Progress | None = None,
                   cancel: threading.Event | None = None, stream: bool = True) -> Iterator[np.ndarray]:
        """Yield float32 audio as it is decoded: with `stream`, the first chunk after about
        `stream_first_frames` frames; without it, one chunk per text segment, decoded in one piece exactly as
        the reference decodes (and without the streamed decode's repeated left context)."""
        for item in self._segments(request, progress, cancel, stream=stream):
            if isinstance(item, np.ndarray) and len(item):
                yield item

    def run(self, request: SynthesisRequest, progress: Progress | None = None,
            cancel: threading.Event | None = None) -> Synthesis:
        start = time.perf_counter()
        seed = request.effective_seed()
        request = replace(request, seed=seed)
        audios, codes, stops, frames = [], [], [], 0
        for item in self._segments(request, progress, cancel):
            if isinstance(item, np.ndarray):
                audios.append(item)
            else:
                codes.append(item.codes)
                stops.append(item.stopped_by_im_end)
                frames += item.frames
        if cancel is not None and cancel.is_set():
            raise Cancelled("synthesis was cancelled")
        return Synthesis(
            sample_rate=self.sample_rate,
            audio=np.concatenate(audios) if audios else np.zeros(0, np.float32),
            codes=np.concatenate(codes, axis=1),
            seed=seed,
            frames_generated=frames,
            stopped_by_im_end=stops,
            seconds=time.perf_counter() - start,
        )

    def _segments(self, request: SynthesisRequest, progress: Progress | None,
                  cancel: threading.Event | None = None, stream: bool = False):
        """Generate and decode each text segment in turn, yielding audio chunks (float32 arrays) and, after
        each segment's audio, its SegmentCodes.

        With `stream`, audio is decoded while frames arrive: the first chunk after `stream_first_frames`
        frames, then chunks twice as long each time up to `stream_max_frames`, each pushed through the segment's
        incremental codec stream (`Codec.stream`), so each frame is decoded once and the audio is the one-shot
        decode's to float rounding. Without it, each segment is decoded once, exactly as the reference decodes.

        From the second segment on, the previous segment's text and codes follow the references in the prompt,
        as the reference's iterative prompt did, so the voice carries over from segment to segment.
        """
        references = [(ref.text.strip(), self.encode_reference(ref)) for ref in request.references]
        segments = split_text(request.text, request.chunk_length)
        # One generator for the whole request, seeded after the references are encoded (as the reference does).
        generator = torch.Generator(device=self.device).manual_seed(request.effective_seed())
        params = SamplingParams(request.temperature, request.top_p, request.repetition_penalty)
        previous: list[tuple[str, torch.Tensor]] = []
        done = 0
        for index, text in enumerate(segments):
            first, last = index == 0, index == len(segments) - 1
            prompt, max_new = self._prompt(text, references + previous, request.max_new_tokens)
            if previous and prompt is None:  # the carried segment made it too long: go without it
                prompt, max_new = self._prompt(text, references, request.max_new_tokens)
            if prompt is None:
                self._prompt(text, references, request.max_new_tokens, strict=True)
            total = done + max_new * (len(segments) - index)
            fault = fault_for(request.text) if self.fault_injection else None
            row = self.scheduler.submit(prompt, params, generator, max_new, self.tokenizer.im_end_id, cancel=cancel,
                                        fault=fault)
            frames: list[torch.Tensor] = []
            emitted, chunk = 0, self.stream_first_frames
            decoder = self.codec.stream() if stream else None
            try:
                for frame in row:
                    if cancel is not None and cancel.is_set():
                        return
                    frames.append(frame)
                    done += 1
                    if progress:
                        progress(done, total)
                    decodable = len(frames) - 1  # the newest frame may be the last, which is never decoded
                    if stream and decodable - emitted >= chunk:
                        audio = self._decode_chunk(decoder, frames, emitted, decodable)
                        yield self._finish_audio(audio, request, fade_in=not first and emitted == 0)
                        emitted, chunk = decodable, min(chunk * 2, self.stream_max_frames)
            except ShoalError:
                raise
            except Exception as exc:
                raise engine_failure(exc) from exc
            finally:
                row.cancel()  # a no-op for a finished row; frees the slot of an abandoned one
            if cancel is not None and cancel.is_set():  # the scheduler ended the row early: nothing more
                return
            seg = SegmentCodes(torch.stack(frames, dim=1), self.tokenizer.im_end_id)
            if stream:
                audio = self._decode_chunk(decoder, frames, emitted, len(frames) - 1)
                yield self._finish_audio(audio, request, fade_in=not first and emitted == 0, fade_out=not last)
            else:
                yield self._finish_audio(self._decode(seg.codes), request, fade_in=not first, fade_out=not last)
            if seg.codes.shape[1]:
                previous = [(text, torch.from_numpy(seg.codes))]
            yield seg

    def _finish_audio(self, audio: np.ndarray, request: SynthesisRequest, fade_in: bool = False,
                      fade_out: bool = False) -> np.ndarray:
        return fade_joins(apply_speed(audio, self.sample_rate, request.speed), self.sample_rate,
                          first=not fade_in, last=not fade_out)

    def _decode_chunk(self, decoder: DecodeStream, frames: list[torch.Tensor], start: int, end: int) -> np.ndarray:
        """Audio of frames [start, end) of a streamed segment: pushed through its incremental decoder, or, past
        the codec transformers' block size (a segment longer than the reference can decode at all), decoded
        again with `stream_context` frames of left context."""
        if end <= start:
            return np.zeros(0, np.float32)
        if decoder.frames + end - start <= decoder.limit:
            codes = torch.stack(frames[start:end], dim=1)[1:].to(self.device)
            self.codec_frames += end - start
            return decoder.push(codes).cpu().numpy()
        left = max(0, start - self.stream_context)
        codes = torch.stack(frames[left:end], dim=1)[1:].numpy().astype(np.int64)
        return self._decode(codes)[(start - left) * self.frame_length :]

    def _prompt(self, text: str, references: list[tuple[str, torch.Tensor]], max_new_tokens: int,
                strict: bool = False) -> tuple[torch.Tensor | None, int]:
        """The prompt and its generation budget, or (None, 0) if it does not fit (BadRequest if strict)."""
        prompt = build_prompt(self.tokenizer, text, references, num_codebooks=self.model.config.num_codebooks)
        try:
            return prompt, check_prompt_length(prompt.shape[1], self.model.config.max_seq_len, max_new_tokens)
        except BadRequest:
            if strict:
                raise
            return None, 0

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes `[num_codebooks, F]` to audio: in one piece, as the reference does, up to the codec's
        `decode_limit` frames; longer segments (which the reference cannot decode at all) in pieces that
        overlap by `stream_context` frames of left context."""
        frames = codes.shape[1]
        if frames == 0:
            return np.zeros(0, np.float32)
        if frames <= self.decode_limit:
            self.codec_frames += frames
            with torch.inference_mode():
                audio = self.codec.decode(torch.from_numpy(codes).to(self.device))
            return audio.float().cpu().numpy()
        step = self.decode_limit - self.stream_context
        pieces = []
        for start in range(0, frames, step):
            left = max(0, start - self.stream_context)
            piece = self._decode(codes[:, left : start + step])
            pieces.append(piece[(start - left) * self.frame_length :])
        return np.concatenate(pieces)

    def close(self) -> None:
        self.scheduler.stop()


def cap_seq_len(model: DualARTransformer, max_seq_len: int) -> None:
    """Lower the model's max_seq_len (a cap above the checkpoint's own changes nothing). Positions past the cap
    are never used, so the codes of a request that fits are the same either way."""
    if max_seq_len <= GENERATION_HEADROOM:
        raise BadRequest(f"max_seq_len must be more than {GENERATION_HEADROOM} (the positions a prompt leaves free "
                         f"for generation), got {max_seq_len}")
    if max_seq_len < model.config.max_seq_len:
        model.config.max_seq_len = max_seq_len
        model.reset_rope()


def persist_compile_cache(directory: Path) -> None:
    """Keep torch.compile's kernels and graphs in `directory`, so a restart reuses them instead of compiling
    again. Inductor reads its cache location from the environment, so this is the one place shoal sets it."""
    import os

    import torch._inductor.config as inductor_config

    directory.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    inductor_config.fx_graph_cache = True


JOIN_FADE_SECONDS = 0.01


def fade_joins(audio: np.ndarray, sample_rate: int, first: bool, last: bool) -> np.ndarray:
    """Short raised-cosine fades where segments meet, so independently decoded segments join without a click.
    A single-segment request is untouched."""
    n = min(int(JOIN_FADE_SECONDS * sample_rate), len(audio) // 2)
    if n == 0 or (first and last):
        return audio
    ramp = (0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, n))).astype(np.float32)
    audio = audio.copy()
    if not first:
        audio[:n] *= ramp
    if not last:
        audio[-n:] *= ramp[::-1]
    return audio


#: Settings.fault_injection's markers: the exception each one raises inside the batched decode step, and in which
#: steps (given how many rows the step decodes). Each fires in every step its request is part of once
#: FAULT_AFTER_FRAMES frames exist, as a real, deterministic failure would, so the scheduler can find its row.
FAULT_MARKERS = {
    "[[fault:error]]": (lambda: RuntimeError("injected fault"), lambda rows: True),
    "[[fault:oom]]": (lambda: torch.cuda.OutOfMemoryError("CUDA out of memory (injected fault)"), lambda rows: True),
    # Out of memory only while more than one row decodes: what halving the batch is for.
    "[[fault:oom-batched]]": (lambda: torch.cuda.OutOfMemoryError("CUDA out of memory (injected fault)"),
                              lambda rows: rows > 1),
}
FAULT_AFTER_FRAMES = 2


def fault_for(text: str) -> Callable[[int, int], None] | None:
    """The scheduler's per-row fault hook for a text carrying a FAULT_MARKERS marker (None without one)."""
    for marker, (make, when) in FAULT_MARKERS.items():
        if marker in text:
            def fault(produced: int, rows: int, make=make, when=when) -> None:
                if produced >= FAULT_AFTER_FRAMES and when(rows):
                    raise make()
            return fault
    return None


def engine_failure(exc: Exception) -> Exception:
    """CUDA out-of-memory passes through (the server makes it a 503); anything else is an EngineFailure."""
    if type(exc).__name__ == "OutOfMemoryError":
        return exc
    return EngineFailure(f"generation failed: {type(exc).__name__}: {exc}")


def apply_speed(audio: np.ndarray, sample_rate: int, speed: float) -> np.ndarray:
    """Tempo change without pitch change; 1.0 is the identity (and keeps parity with the reference)."""
    if speed == 1.0 or not len(audio):
        return audio
    from shoal.audio import change_speed

    return change_speed(audio, sample_rate, speed)


class SegmentCodes:
    """The frames one segment generated, and the codes the codec gets: all frames but the last."""

    def __init__(self, frames: torch.Tensor, im_end_id: int):
        self.frames = frames.shape[1]
        self.generated = frames.numpy().astype(np.int64)  # [1 + num_codebooks, frames]
        self.codes = self.generated[1:, :-1]
        self.stopped_by_im_end = bool(frames.shape[1] and int(frames[0, -1]) == im_end_id)


