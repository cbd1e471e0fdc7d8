"""The codec as its own stage of the engine, like sglang's detokenizer: codes in, audio out, on the engine thread.

The fish engine hands the stage each segment's frames as they arrive (`frame_added`) and when the segment ends
(`segment_ended`), plus events that must follow the audio (`then`). The stage owns the streaming chunk rule,
keeps one incremental decoder (`Codec.stream`) per streamed segment so each frame goes through the codec once,
and, at the end of every engine step (`flush`), decodes what is due: the next chunk of every request, in order,
with the chunks of several requests in one codec call where their shapes allow (`push_streams`). Audio and
events reach their owner through the callbacks given with them, in the order they were queued.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from shoal.fish.codec import Codec, DecodeStream, push_streams

log = logging.getLogger("shoal.codec")

#: The largest streamed chunk, in frames (~3 s): chunks double from the first one up to this.
STREAM_MAX_FRAMES = 64
# Left context for decoding codes longer than the codec's block in overlapping pieces, beyond its attention window:
# the causal convolutions' reach, in frames, with room to spare (the test measures the error).
STREAM_CONTEXT_MARGIN = 8

AudioCallback = Callable[[np.ndarray], None]


@dataclass(eq=False)
class SegmentStream:
    """One streamed segment's place in the chunk rule and its incremental decoder."""

    decoder: DecodeStream
    chunk: int  # frames in the next chunk
    emitted: int = 0  # frames decoded so far


@dataclass(eq=False)
class _Item:
    owner: Any
    kind: str  # "stream" (a chunk of a SegmentStream), "whole" (codes decoded in one piece), "call"
    then: Callable[..., None]
    codes: torch.Tensor | np.ndarray | None = None
    segment: SegmentStream | None = None
    frames: list = field(default_factory=list)  # "stream": the segment's frames, for the fallback past the block
    start: int = 0


class CodecStage:
    """Streaming decode, batched across requests. Not thread-safe: the engine thread alone calls it."""

    def __init__(self, codec: Codec, stream_first_frames: int, on_error: Callable[[Any, BaseException], None]):
        self.codec = codec
        self.device = codec.device
        self.frame_length = codec.config.frame_length
        #: Streaming: frames before the first chunk (11 is about 0.5 s) and the largest chunk.
        self.first_frames = max(1, stream_first_frames)
        self.max_frames = STREAM_MAX_FRAMES
        #: The most frames the codec decodes at once (its transformers' block size); longer codes go in pieces
        #: that overlap by `context` frames of left context (its attention window plus its convolutions' reach).
        self.decode_limit = codec.config.quantizer_transformer.block_size
        window = codec.config.quantizer_transformer.window_size
        self.context = min(window + STREAM_CONTEXT_MARGIN if window else self.decode_limit, self.decode_limit // 2)
        #: Called as on_error(owner, exc) when decoding an owner's audio fails; its queued work is dropped.
        self.on_error = on_error
        self._queues: OrderedDict[Any, deque[_Item]] = OrderedDict()
        #: Frames through the codec decoder (left context included): about the frames generated.
        self.frames = 0
        #: Codec calls that decoded the chunks of more than one request.
        self.batched_calls = 0

    # -- what the engine hands in ------------------------------------------------------------------------------
    def open(self, first_chunk_scale: float = 1.0) -> SegmentStream:
        """The state of a new streamed segment, whose first chunk is `first_chunk_scale` times the usual."""
        return SegmentStream(self.codec.stream(), max(1, round(self.first_frames * first_chunk_scale)))

    def frame_added(self, owner: Any, segment: SegmentStream, frames: list[torch.Tensor],
                    then: AudioCallback) -> None:
        """A streamed segment has `frames` so far: queue its next chunk if the chunk rule says it is due. The
        newest frame may be the segment's last, which is never decoded, so it waits."""
        decodable = len(frames) - 1
        if decodable - segment.emitted >= segment.chunk:
            self._queue(owner, _Item(owner, "stream", then, segment=segment, frames=frames,
                                     start=segment.emitted, codes=_stack(frames, segment.emitted, decodable)))
            segment.emitted = decodable
            segment.chunk = min(segment.chunk * 2, self.max_frames)

    def segment_ended(self, owner: Any, segment: SegmentStream | None, frames: list[torch.Tensor],
                      then: AudioCallback) -> None:
        """The segment generated its last frame: queue the rest of its audio (all but the last frame), the rest
        of the stream, or, unstreamed (`segment` None), the whole segment decoded in one piece, as the reference
        decodes."""
        end = len(frames) - 1
        if segment is None:
            codes = _stack(frames, 0, end).numpy().astype(np.int64) if end > 0 else None
            self._queue(owner, _Item(owner, "whole", then, codes=codes))
        else:
            codes = _stack(frames, segment.emitted, end) if end > segment.emitted else None
            self._queue(owner, _Item(owner, "stream", then, segment=segment, frames=frames, start=segment.emitted,
                                     codes=codes))
            segment.emitted = max(end, segment.emitted)

    def then(self, owner: Any, call: Callable[[], None]) -> None:
        """Call `call` once everything queued for `owner` before it has been delivered."""
        self._queue(owner, _Item(owner, "call", call))

    def drop(self, owner: Any) -> None:
        """Forget what is queued for `owner` (it failed or went away)."""
        self._queues.pop(owner, None)

    @property
    def pending(self) -> bool:
        return bool(self._queues)

    # -- the stage itself --------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Deliver everything queued: round by round, the next item of every owner, with streamed chunks that
        share a shape decoded together."""
        with torch.inference_mode():
            while self._queues:
                heads = [(owner, queue[0]) for owner, queue in self._queues.items()]
                batchable: dict[tuple[int, int], list[_Item]] = {}
                for owner, item in heads:
                    if item.kind == "stream" and item.codes is not None and self._incremental(item):
                        batchable.setdefault((item.segment.decoder.frames, item.codes.shape[-1]), []).append(item)
                    else:
                        self._guarded([item], self._one)
                for group in batchable.values():
                    self._guarded(group, self._streamed)
                for owner, item in heads:
                    queue = self._queues.get(owner)
                    if queue is not None and queue and queue[0] is item:
                        queue.popleft()
                        if not queue:
                            del self._queues[owner]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes `[num_codebooks, F]` to audio: in one piece, as the reference does, up to `decode_limit`
        frames; longer segments (which the reference cannot decode at all) in pieces that overlap by `context`
        frames of left context."""
        frames = codes.shape[1]
        if frames == 0:
            return np.zeros(0, np.float32)
        if frames <= self.decode_limit:
            self.frames += frames
            with torch.inference_mode():
                audio = self.codec.decode(torch.from_numpy(codes).to(self.device))
            return audio.float().cpu().numpy()
        step = self.decode_limit - self.context
        pieces = []
        for start in range(0, frames, step):
            left = max(0, start - self.context)
            piece = self.decode(codes[:, left : start + step])
            pieces.append(piece[(start - left) * self.frame_length :])
        return np.concatenate(pieces)

    # -- inside ------------------------------------------------------------------------------------------------
    def _queue(self, owner: Any, item: _Item) -> None:
        self._queues.setdefault(owner, deque()).append(item)

    def _incremental(self, item: _Item) -> bool:
        return item.segment.decoder.frames + item.codes.shape[-1] <= item.segment.decoder.limit

    def _guarded(self, items: list[_Item], run: Callable[[list[_Item]], None]) -> None:
        try:
            run(items)
        except Exception as exc:
            if len(items) > 1:  # find the owner whose chunk fails: the others' decode alone
                for item in items:
                    self._guarded([item], run)
                return
            for item in items:  # its audio is lost: it fails, the others go on
                self.drop(item.owner)
                self.on_error(item.owner, exc)

    def _one(self, items: list[_Item]) -> None:
        (item,) = items
        if item.kind == "call":
            item.then()
        elif item.kind == "whole":
            item.then(self.decode(item.codes) if item.codes is not None else np.zeros(0, np.float32))
        elif item.codes is None:  # a streamed segment whose last chunk was already out
            item.then(np.zeros(0, np.float32))
        else:  # past the codec transformers' block: decoded again with `context` frames of left context
            end = item.start + item.codes.shape[-1]
            left = max(0, item.start - self.context)
            codes = _stack(item.frames, left, end).numpy().astype(np.int64)
            item.then(self.decode(codes)[(item.start - left) * self.frame_length :])

    def _streamed(self, items: list[_Item]) -> None:
        audio = push_streams([i.segment.decoder for i in items], [i.codes.to(self.device) for i in items])
        self.frames += sum(i.codes.shape[-1] for i in items)
        if len(items) > 1:
            self.batched_calls += 1
        for item, chunk in zip(items, audio):
            item.then(chunk.cpu().numpy())


def _stack(frames: list[torch.Tensor], start: int, end: int) -> torch.Tensor:
    """The codes `[num_codebooks, end - start]` of frames [start, end) (each frame is [token, codes...])."""
    return torch.stack(frames[start:end], dim=1)[1:]
