"""The Fish Speech engine (S1 and S2 checkpoints): loads a checkpoint once and turns requests into audio.

It owns the model, the codec and the tokenizer from `shoal.fish`, the batch scheduler whose one engine thread
runs every torch operation (decode steps, reference encodes, codec decodes), the codec stage that turns frames
into audio, and a bounded cache of encoded reference clips. A request is a small state machine on that thread
(`_Utterance`): its text segments are generated one after another as rows of the shared batch, and its audio goes
to the request's sink. No thread waits per request.

The model decides how a request becomes segments and prompts. S1: sentence-sized segments (`text.split_text`),
each prompt the references plus the previous segment (`fish.prompt.build_prompt`). S2: speaker-turn batches
(`text.speaker_batches`), each prompt the conversation so far (`fish.conversation.build_s2_prompt`: the
references as speakers 0, 1, ..., then every earlier batch's text and codes), as fish-speech 2.0's
`generate_long` runs it. Either way one generator, seeded once per request, runs on across the segments.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from shoal.audio import load_audio
from shoal.errors import BadRequest, EngineFailure, ShoalError
from shoal.fish.checkpoint import check_checkpoint_dir, load_checkpoint_codec, load_dual_ar, load_tokenizer
from shoal.layout import GENERATION_HEADROOM, MODEL_NAMES
from shoal.fish.codec import Codec
from shoal.fish.conversation import build_s2_prompt
from shoal.fish.dual_ar import DualARTransformer
from shoal.fish.generate import s2_sampling
from shoal.fish.prompt import build_prompt, check_prompt_length
from shoal.fish.quant import quantize_int8
from shoal.fish.runner import ModelRunner
from shoal.fish.sampling import SamplingParams
from shoal.fish.tokenizer import FishTokenizer
from shoal.fish.tokenizer_s2 import S2Tokenizer
from shoal.text import before_first_speaker, speaker_batches, split_text

from .base import (LATENCY_FIRST_CHUNK, EngineStats, Progress, Reference, Segment, Sink, Synthesis,
                   SynthesisRequest, run_blocking, synthesize_blocking)
from .codec_stage import CodecStage, SegmentStream
from .scheduler import BatchScheduler, Row

PRECISIONS = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


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
    """Text (plus optional reference clips) to audio with an S1 or S2 checkpoint."""

    name = "fish"
    supports_cloning = True

    def __init__(self, model: DualARTransformer, codec: Codec, tokenizer: FishTokenizer | S2Tokenizer, *,
                 checkpoint_dir: Path | None = None, reference_cache_size: int = 16, max_batch_size: int = 4,
                 max_batch_tokens: int | None = None, stream_first_frames: int = 11, fault_injection: bool = False,
                 compile: bool = False, cuda_graphs: bool = False, max_reference_seconds: float | None = None):
        self.model = model
        self.codec = codec
        self.tokenizer = tokenizer
        #: An S2 model: speaker-turn segments, conversation prompts and S2's sampler (fish.generate.s2_sampling).
        self.s2 = s2_sampling(model)
        #: The model this engine serves, by its served name (`s1`, `s2-pro`).
        self.model_name = MODEL_NAMES["s2" if self.s2 else "s1"]
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
        self._references_lock = threading.Lock()  # looked up from the callers' threads, filled on the engine's
        #: How many times a reference clip went through the codec encoder (cache misses).
        self.encode_count = 0
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
        self._requests = 0  # submitted and not yet ended
        self._requests_lock = threading.Lock()
        self.runner = ModelRunner(model, max_batch_size, compile=compile, cuda_graphs=cuda_graphs)
        if compile:
            model.setup_caches(batch=max_batch_size)  # static: allocated once, before compiling
            self.runner.warm_up()
        self.scheduler = BatchScheduler(model, max_batch=max_batch_size, max_tokens=max_batch_tokens,
                                        runner=self.runner)
        #: Streaming: frames before the first chunk (11 is about 0.5 s); the stage doubles chunks from there.
        self.codec_stage = CodecStage(codec, stream_first_frames, on_error=self._fail)
        self.scheduler.after_step = self.codec_stage.flush

    @classmethod
    def load(cls, checkpoint_dir: str | Path, device: str | torch.device | None = "auto",
             precision: str | torch.dtype | None = "auto", compile: bool = False,
             reference_cache_size: int = 16, max_batch_size: int = 4, max_batch_tokens: int | None = None,
             stream_first_frames: int = 11, fault_injection: bool = False, cuda_graphs: bool = False,
             compile_cache_dir: str | Path | None = None, max_reference_seconds: float | None = None,
             max_seq_len: int | None = None, quantize: str = "none") -> "FishEngine":
        """Load a checkpoint directory (S1 or S2, by its own files) once. Raises CheckpointError naming a missing or
        mismatched file.

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
        tokenizer = load_tokenizer(path)
        model = load_dual_ar(path, tokenizer, dev, dtype)
        if quantize == "int8":
            quantize_int8(model)
        if max_seq_len is not None:
            cap_seq_len(model, max_seq_len)
        # The codec stays float32: it is a small share of the time and bf16 audibly degrades decoding.
        codec = load_checkpoint_codec(path, device=dev, dtype=torch.float32)
        engine = cls(model, codec, tokenizer, checkpoint_dir=path, reference_cache_size=reference_cache_size,
                     max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                     stream_first_frames=stream_first_frames, fault_injection=fault_injection, compile=compile,
                     cuda_graphs=cuda_graphs, max_reference_seconds=max_reference_seconds)
        engine.compile_cache_dir = cache_dir
        engine.quantize = quantize
        return engine

    # -- references --------------------------------------------------------------------------------------------
    def _lookup_reference(self, reference: Reference) -> "torch.Tensor | _Clip":
        """A reference's codes `[num_codebooks, F]` if they are at hand (its own `codes`, or the bounded LRU keyed
        by the clip's sha256), else its clip decoded to audio for the engine thread to encode (`_encode_clip`).
        Any thread: it reads and decodes, and runs no torch."""
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
        return _Clip(key, load_audio(data, target_sr=self.sample_rate, **limit), reference.cache)

    def _encode_clip(self, clip: "_Clip") -> torch.Tensor:
        """Engine thread: a clip's codes from the codec encoder, kept in the LRU if its request allows."""
        codes = torch.from_numpy(self._encode(clip.audio))
        if clip.cache and self.reference_cache_size > 0:
            with self._references_lock:
                self._references[clip.key] = codes
                while len(self._references) > self.reference_cache_size:
                    self._references.popitem(last=False)
        return codes

    def encode_reference(self, reference: Reference) -> torch.Tensor:
        """Codes `[num_codebooks, F]` of a reference clip (cached, or encoded on the engine thread)."""
        found = self._lookup_reference(reference)
        return found if isinstance(found, torch.Tensor) else self.scheduler.call(lambda: self._encode_clip(found))

    def encode_audio(self, audio: np.ndarray) -> np.ndarray:
        """Codec codes int64 `[num_codebooks, F]` of float32 mono audio at `sample_rate` (always encodes, on the
        engine thread, between decode steps)."""
        return self.scheduler.call(lambda: self._encode(audio))

    def _encode(self, audio: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            try:
                codes = self.codec.encode(torch.from_numpy(np.ascontiguousarray(audio, np.float32)).to(self.device))
            except ValueError as exc:  # longer than the codec's transformers take in one piece
                if "block_size" not in str(exc):
                    raise
                raise BadRequest(f"the reference clip is {len(audio) / self.sample_rate:.1f} s, longer than this "
                                 "checkpoint's codec encodes in one piece; use a shorter clip") from None
        self.encode_count += 1
        return codes.cpu().numpy().astype(np.int64)

    def _check_codes(self, codes, what: str = "reference codes", generated: bool = False) -> torch.Tensor:
        """Codes as the codec's codebooks bound them; `generated` codes (a segment's) of an S2 model may reach the
        model's codebook_size in every row (S2 samples residual codes over it; the codec clamps them)."""
        codes = np.asarray(codes)
        c = self.codec.config
        if codes.ndim != 2 or codes.shape[0] != c.num_codebooks or codes.shape[1] == 0:
            raise BadRequest(f"{what} must be [{c.num_codebooks}, frames], got {tuple(codes.shape)}")
        if generated and self.s2:
            limits = np.full(c.num_codebooks, self.model.config.codebook_size)
        else:
            limits = np.array([c.semantic_codebook_size] + [c.codebook_size] * (c.num_codebooks - 1))
        if not np.issubdtype(codes.dtype, np.integer) or (codes < 0).any() or (codes >= limits[:, None]).any():
            raise BadRequest(f"{what} are out of the codebooks' range")
        return torch.from_numpy(codes.astype(np.int64))

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
    def submit(self, request: SynthesisRequest, sink: Sink, cancel: threading.Event | None = None,
               stream: bool = True, progress: Progress | None = None) -> None:
        """Start `request` and return: its audio reaches `sink` from the engine thread. Reference clips are
        read and decoded here, in the caller's thread (a bad clip raises BadRequest at once); the rest runs on
        the engine thread.

        With `stream`, audio is decoded while frames arrive, by the codec stage's chunk rule, each frame once, to
        float rounding of the one-shot decode. Without it, each segment is decoded once, exactly as the reference
        decodes. Segments are generated one after another: from the second on, the previous segment's text and
        codes follow the references in the prompt (S1, as the reference's iterative prompt did; S2: every
        earlier segment's, as a conversation), so the voice carries over; `request.previous` (what an earlier
        request spoke) is carried into the first segment's prompt the same way. S1 strips reference transcripts,
        as S1's reference does; S2 uses them verbatim, as S2's does. An S2 text with speaker tags must start with
        one: the reference silently drops what comes before the first tag, shoal refuses it (BadRequest)."""
        lead = before_first_speaker(request.text).strip() if self.s2 else ""
        if lead:
            raise BadRequest(f"the text before the first <|speaker:N|> tag ({lead[:40]!r}) would not be spoken: "
                             "S2-Pro speaks speaker turns only, so start the text with a speaker tag or use none")
        references = [(ref.text if self.s2 else ref.text.strip(), self._lookup_reference(ref))
                      for ref in request.references]
        previous = []
        if request.previous is not None and request.condition_on_previous:
            text, codes = request.previous
            previous = [(text, self._check_codes(codes, "previous codes", generated=True))]
        utterance = _Utterance(request, sink, cancel, stream, progress, references,
                               seed=request.effective_seed(), previous=previous)
        with self._requests_lock:
            self._requests += 1
        try:
            self.scheduler.call_soon(lambda: self._start(utterance))
        except BaseException:
            self._ended()
            raise

    def synthesize(self, request: SynthesisRequest, progress: Progress | None = None,
                   cancel: threading.Event | None = None, stream: bool = True) -> Iterator[np.ndarray]:
        """Blocking: yield float32 audio as it is decoded (see `submit`)."""
        return synthesize_blocking(self, request, progress, cancel, stream)

    def run(self, request: SynthesisRequest, progress: Progress | None = None,
            cancel: threading.Event | None = None) -> Synthesis:
        """Blocking: the whole request, with its codes, decoded as the reference decodes."""
        return run_blocking(self, replace(request, seed=request.effective_seed()), progress, cancel)

    def stats(self) -> EngineStats:
        s, stage = self.scheduler, self.codec_stage
        return EngineStats(in_flight=self._requests, batch_size=s.batch_size, decode_steps=s.steps,
                           generated_tokens=s.frames_generated, tokens_per_second=s.tokens_per_second,
                           isolated_faults=s.isolated_faults, codec_encodes=self.encode_count,
                           codec_frames=stage.frames, codec_batches=stage.batched_calls,
                           reference_cache_hits=self.reference_cache_hits,
                           reference_cache_misses=self.reference_cache_misses)

    # The rest runs on the engine thread.
    def _start(self, u: "_Utterance") -> None:
        try:
            if u.cancelled:
                return self._finish(u)
            u.references = [(text, codes if isinstance(codes, torch.Tensor) else self._encode_clip(codes))
                            for text, codes in u.references]
            if self.s2:
                u.segments = speaker_batches(u.request.text, u.request.chunk_length)
            else:
                u.segments = split_text(u.request.text, u.request.chunk_length, u.request.min_chunk_length)
            # One generator for the whole request, seeded after the references are encoded (as the reference does:
            # S2's set_seed seeds torch's global generators, CPU and CUDA, which every batch then draws from).
            u.generator = torch.Generator(device=self.device).manual_seed(u.seed)
            self._next_segment(u)
        except BaseException as exc:
            self._fail(u, exc)

    def _next_segment(self, u: "_Utterance") -> None:
        request, text = u.request, u.segments[u.index]
        # What is carried made the prompt too long: go without its oldest segments, or without it.
        for start in range(len(u.previous) + 1):
            prompt, max_new = self._prompt(text, u.references, u.previous[start:], request.max_new_tokens)
            if prompt is not None:
                u.previous = u.previous[start:]
                break
        else:
            self._prompt(text, u.references, [], request.max_new_tokens, strict=True)
        u.total = u.done + max_new * (len(u.segments) - u.index)
        u.frames = []
        u.stream_state = self.codec_stage.open(LATENCY_FIRST_CHUNK[request.latency]) if u.stream else None
        params = SamplingParams(request.temperature, request.top_p, request.repetition_penalty)
        fault = fault_for(request.text) if self.fault_injection else None
        u.row = self.scheduler.submit(prompt, params, u.generator, max_new, self.tokenizer.im_end_id,
                                      cancel=u.cancel, fault=fault, on_frame=lambda f: self._on_frame(u, f),
                                      on_end=lambda error: self._on_row_end(u, error))

    def _on_frame(self, u: "_Utterance", frame: torch.Tensor) -> None:
        u.frames.append(frame)
        u.done += 1
        if u.progress is not None:
            u.progress(u.done, u.total)
        if u.stream_state is not None:
            fade_in = u.index > 0 and u.stream_state.emitted == 0  # a later segment's first chunk
            self.codec_stage.frame_added(u, u.stream_state, u.frames,
                                         lambda audio: self._deliver(u, audio, fade_in=fade_in))

    def _on_row_end(self, u: "_Utterance", error: BaseException | None) -> None:
        u.row = None
        if error is not None:
            return self._fail(u, error)
        if u.cancelled:
            return self._finish(u)
        frames, index = u.frames, u.index
        last = index == len(u.segments) - 1
        segment = Segment(text=u.segments[index], codes=torch.stack(frames, dim=1)[1:, :-1].numpy().astype(np.int64),
                          frames=len(frames),
                          stopped_by_im_end=bool(frames and int(frames[-1][0]) == self.tokenizer.im_end_id))
        fade_in = index > 0 and (u.stream_state is None or u.stream_state.emitted == 0)
        self.codec_stage.segment_ended(
            u, u.stream_state, frames, lambda audio: self._deliver(u, audio, fade_in=fade_in, fade_out=not last))
        self.codec_stage.then(u, lambda: u.sink.segment(segment))
        if last:
            return self.codec_stage.then(u, lambda: self._finish(u))
        if u.request.condition_on_previous and (self.s2 or segment.codes.shape[1]):
            carried = (u.segments[index], torch.from_numpy(segment.codes))
            # S2 carries the whole conversation (even a segment without codes keeps its turn), S1 the last one.
            u.previous = [*u.previous, carried] if self.s2 else [carried]
        u.index += 1
        try:
            self._next_segment(u)
        except BaseException as exc:
            self._fail(u, exc)

    def _deliver(self, u: "_Utterance", audio: np.ndarray, fade_in: bool = False, fade_out: bool = False) -> None:
        """A decoded chunk to its request: at its speed, faded in or out where segments meet (S1 only: S2's
        reference joins its batches' audio as decoded, and so does shoal)."""
        if u.closed or not len(audio):
            return
        audio = apply_speed(audio, self.sample_rate, u.request.speed)
        if not self.s2:
            audio = fade_joins(audio, self.sample_rate, first=not fade_in, last=not fade_out)
        u.sink.audio(audio)

    def _fail(self, u: "_Utterance", error: BaseException) -> None:
        if u.closed:
            return
        if u.row is not None:
            u.row.cancel()
        self.codec_stage.drop(u)
        self._close(u, error if isinstance(error, ShoalError) else engine_failure(error))

    def _finish(self, u: "_Utterance") -> None:
        if not u.closed:
            self._close(u, None)

    def _close(self, u: "_Utterance", error: BaseException | None) -> None:
        u.closed = True
        self._ended()
        u.sink.end(error)

    def _ended(self) -> None:
        with self._requests_lock:
            self._requests -= 1

    def build_prompt(self, text: str, references: list[tuple[str, torch.Tensor]] = (),
                     previous: list[tuple[str, torch.Tensor]] = ()) -> torch.Tensor:
        """The model's prompt `[1 + num_codebooks, L]` for `text` after the references and the carried segments:
        S1's layout (the carried segment as one more reference) or S2's conversation."""
        num_codebooks = self.model.config.num_codebooks
        if self.s2:
            return build_s2_prompt(self.tokenizer, text, references, previous, num_codebooks=num_codebooks)
        return build_prompt(self.tokenizer, text, [*references, *previous], num_codebooks=num_codebooks)

    def _prompt(self, text: str, references: list[tuple[str, torch.Tensor]],
                previous: list[tuple[str, torch.Tensor]], max_new_tokens: int,
                strict: bool = False) -> tuple[torch.Tensor | None, int]:
        """The prompt for `text` after the references and the carried segments, and its generation budget, or
        (None, 0) if it does not fit (BadRequest if strict)."""
        prompt = self.build_prompt(text, references, previous)
        try:
            return prompt, check_prompt_length(prompt.shape[1], self.model.config.max_seq_len, max_new_tokens)
        except BadRequest:
            if strict:
                raise
            return None, 0

    def close(self) -> None:
        self.scheduler.stop()


@dataclass(eq=False)
class _Clip:
    """A reference clip that is not in the cache yet: its sha256 and its audio, to encode on the engine thread."""

    key: str
    audio: np.ndarray
    cache: bool


@dataclass(eq=False)
class _Utterance:
    """One request on the engine thread: its segments, where it is, and where its audio goes."""

    request: SynthesisRequest
    sink: Sink
    cancel: threading.Event | None
    stream: bool
    progress: Progress | None
    references: list
    seed: int
    segments: list[str] = field(default_factory=list)
    index: int = 0  # the segment being generated
    #: (text, codes) carried into the next prompt: S1 the last segment's, S2 every earlier segment's.
    previous: list = field(default_factory=list)
    generator: torch.Generator | None = None
    frames: list = field(default_factory=list)  # this segment's so far
    stream_state: SegmentStream | None = None
    row: Row | None = None
    done: int = 0  # frames generated over all segments
    total: int = 0  # an upper bound of `done` at the end
    closed: bool = False  # its sink has ended

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


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
