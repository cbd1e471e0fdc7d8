"""Where the scheduler's forward passes run: eagerly, or through `torch.compile` with bucketed shapes.

Eager is the default and the reference-exact path. Compiled, the decode step sees a handful of shapes only, so
it compiles a few times at most and never per request:

- the batch is padded up to a bucket (1, 2, 4, 8, ... up to the scheduler's max batch); the active rows hold
  slots 0..n-1, so padded rows write into cache slots that no request holds, and cannot disturb real rows;
- the attended key length is rounded up to a power of two (at least `MIN_KEYS`); the causal mask hides the
  extra keys;
- the fast transformer always attends over its whole 10-position cache with a position tensor, so one graph
  serves every codebook position;
- the KV caches are allocated once at full length (static), so no graph is invalidated by a cache growing.

With `cuda_graphs` the compiled graphs are also captured as CUDA graphs (mode "reduce-overhead"), one per
bucket. Compiled output is allclose to eager output, not bit-identical (fused kernels sum in another order).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dual_ar import DualARTransformer

MIN_KEYS = 256


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two below `max_batch`, then `max_batch` itself."""
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    return buckets + [max_batch]


def key_bucket(n_keys: int, max_seq_len: int) -> int:
    size = MIN_KEYS
    while size < n_keys:
        size *= 2
    return min(size, max_seq_len)


class ModelRunner:
    """The decode-step forwards of a DualARTransformer for a scheduler of up to `max_batch` rows."""

    def __init__(self, model: DualARTransformer, max_batch: int, compile: bool = False, cuda_graphs: bool = False):
        self.model = model
        self.max_batch = max_batch
        self.compiled = compile
        self.buckets = batch_buckets(max_batch)
        if compile:
            mode = "reduce-overhead" if cuda_graphs else None
            # dynamic=None: torch's automatic dynamic shapes. A size that changes between calls (the key length,
            # the batch bucket) is recompiled once as a symbolic size, so buckets cost one extra graph, not one
            # graph each; CUDA graphs still record one graph per bucket.
            self._slow = torch.compile(model.forward_slow, mode=mode, dynamic=None)
            self._fast = torch.compile(model.forward_fast, mode=mode, dynamic=None)

    @property
    def static_cache(self) -> bool:
        """Compiled graphs need caches that never move: allocate them once, at full length."""
        return self.compiled

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile before the first request does: every batch bucket at two key lengths (the second makes the
        key length symbolic). Needs the static caches to exist; what it writes there no request owns yet."""
        if not self.compiled:
            return
        model, c = self.model, self.model.config
        device = model.embeddings.weight.device
        for b in self.buckets:
            for n_keys in (key_bucket(1, c.max_seq_len), key_bucket(MIN_KEYS + 1, c.max_seq_len)):
                x = torch.zeros((b, 1 + c.num_codebooks, 1), dtype=torch.long, device=device)
                pos = torch.full((b, 1), n_keys - 1, dtype=torch.long, device=device)
                self._slow(x, pos, None, n_keys)
            hidden = torch.zeros((b, c.fast_dim), dtype=model.embeddings.weight.dtype, device=device)
            for k in (0, 1):
                self._fast(hidden, torch.full((b, 1), k, dtype=torch.long, device=device), None, c.num_codebooks)

    def _pad(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def slow(self, x: Tensor, pos: Tensor, start: int | None, n_keys: int) -> tuple[Tensor, Tensor]:
        """One decode step of the slow transformer: x `[B, 11, 1]` at positions `pos` `[B, 1]` of cache rows
        start..start+B-1, attending `n_keys` positions -> (logits `[B, vocab]`, hidden `[B, fast_dim]`).
        Compiled only for the whole batch (start None); a part of it (a failed step replayed row by row) runs
        eagerly."""
        if not self.compiled or start is not None:
            return self.model.forward_slow(x, pos, rows=start, n_keys=n_keys)
        n, padded = x.shape[0], self._pad(x.shape[0])
        n_keys = key_bucket(n_keys, self.model.config.max_seq_len)
        if padded > n:
            x = torch.cat([x, x.new_zeros((padded - n, *x.shape[1:]))])
            pos = torch.cat([pos, pos.new_zeros((padded - n, 1))])
        logits, hidden = self._slow(x, pos, None, n_keys)
        # Clones: with CUDA graphs, a graph's outputs are overwritten by its next replay.
        return logits[:n].clone(), hidden[:n].clone()

    def fast(self, x: Tensor, k: int, start: int | None) -> Tensor:
        """One fast-transformer step at codebook position `k` (sample_frame's `fast`)."""
        if not self.compiled or start is not None:
            return self.model.forward_fast(x, k, start)
        x = x.contiguous()  # one layout, one graph
        n, padded = x.shape[0], self._pad(x.shape[0])
        if padded > n:
            x = torch.cat([x, x.new_zeros((padded - n, x.shape[1]))])
        pos = torch.full((padded, 1), k, dtype=torch.long, device=x.device)
        return self._fast(x, pos, None, self.model.config.num_codebooks)[:n].clone()
