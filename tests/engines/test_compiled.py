"""The compiled decode step (torch.compile, bucketed shapes, static KV caches) against the eager one, on CPU.

Compiled kernels may sum in another order than eager ones, so the logits are compared with a tolerance. On this
fp32 fixture the sampled codes come out identical too, which the golden test pins down: a padding row that
leaked into a real one, or a mask that let a padded key through, changes them at once.
"""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np
import pytest
import torch

from shoal.engines.base import SynthesisRequest
from shoal.engines.fish import FishEngine
from shoal.errors import BadRequest
from shoal.fish.runner import batch_buckets, key_bucket

from support import as_request, as_s2_request, batch_outputs, load_golden, load_requests, s2_requests

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """The compile cache dir the compiled engine is given (empty until it compiles)."""
    return tmp_path_factory.mktemp("compile-cache")


@pytest.fixture(scope="module")
def compiled(fixture_dir, compile_cache):
    return FishEngine.load(fixture_dir, device="cpu", precision="float32", compile=True, max_batch_size=4,
                           compile_cache_dir=compile_cache)


@pytest.fixture(scope="module")
def eager(fixture_dir):
    return FishEngine.load(fixture_dir, device="cpu", precision="float32", max_batch_size=4)


def test_buckets():
    assert batch_buckets(1) == [1] and batch_buckets(4) == [1, 2, 4] and batch_buckets(6) == [1, 2, 4, 6]
    assert [key_bucket(n, 8192) for n in (1, 256, 257, 5000, 9000)] == [256, 256, 512, 8192, 8192]
    assert key_bucket(3000, 2560) == 2560


@torch.inference_mode()
def test_padded_compiled_steps_match_eager_steps(compiled, eager):
    """Three rows in slots 0..2 (padded to a bucket of 4: the padding writes into the free slot 3) at different
    positions: same logits, same caches for the rows that own them."""
    torch.manual_seed(0)
    results = []
    for engine in (eager, compiled):
        model, runner = engine.model, engine.runner
        engine.scheduler._ensure_cache(300)
        for layer in model.layers:  # the same cache contents in both
            g = torch.Generator().manual_seed(1)
            kv = layer.attention.kv_cache
            kv.k[:4, :, :300].copy_(torch.randn(kv.k[:4, :, :300].shape, generator=g))
            kv.v[:4, :, :300].copy_(torch.randn(kv.v[:4, :, :300].shape, generator=g))
        g = torch.Generator().manual_seed(2)
        x = torch.randint(0, 100, (3, 1 + model.config.num_codebooks, 1), generator=g)
        pos = torch.tensor([[5], [120], [299]])
        logits, hidden = runner.slow(x, pos, None, 300)
        fast = [runner.fast(hidden, 0, None)] + [runner.fast(model.fast_embeddings(x[:, k, 0]), k, None)
                                                  for k in range(1, model.config.num_codebooks)]
        caches = torch.stack([layer.attention.kv_cache.k[:3, :, :300] for layer in model.layers])
        results.append((logits, hidden, torch.stack(fast), caches))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_compiled_engine_gives_the_golden_codes_alone_and_batched(compiled, fixture_dir):
    requests = load_requests(fixture_dir)
    golden = {r["name"]: load_golden(fixture_dir, r)["codes"] for r in requests}
    for req in requests:
        np.testing.assert_array_equal(compiled.run(as_request(fixture_dir, req)).codes, golden[req["name"]],
                                      err_msg=req["name"])
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(compiled.run, [as_request(fixture_dir, r) for r in requests]))
    for req, result in zip(requests, results):
        np.testing.assert_array_equal(result.codes, golden[req["name"]], err_msg=req["name"])


def test_compiled_caches_are_static(compiled):
    model = compiled.model
    assert model.cache_seq_len == model.config.max_seq_len and model.cache_batch == 4
    before = model.layers[0].attention.kv_cache.k.data_ptr()
    compiled.run(SynthesisRequest(text="Static caches stay put.", seed=1, max_new_tokens=20))
    assert model.layers[0].attention.kv_cache.k.data_ptr() == before


def test_compile_cache_is_written_under_the_given_dir(compiled, compile_cache):
    """The dir handed to `FishEngine.load` (not one the engine picks) is where inductor writes what it compiles."""
    compiled.run(SynthesisRequest(text="Kernels on disk.", seed=3, max_new_tokens=8))  # compiled by now, if not before
    assert compiled.compile_cache_dir == compile_cache
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(compile_cache)
    written = [path.relative_to(compile_cache) for path in compile_cache.rglob("*") if path.is_file()]
    assert any(path.suffix == ".py" for path in written), written  # inductor's generated kernels
    assert any(path.parts[0] == "fxgraph" for path in written), written  # its FX graph cache, which a restart reuses


def test_cuda_graphs_need_compile_and_cuda(fixture_dir):
    with pytest.raises(BadRequest, match="cuda_graphs"):
        FishEngine.load(fixture_dir, device="cpu", compile=True, cuda_graphs=True)
    with pytest.raises(BadRequest, match="cuda_graphs"):
        FishEngine.load(fixture_dir, device="cpu", cuda_graphs=True)


def test_compiled_s2_engine_gives_the_golden_codes_alone_and_batched(s2_fixture_dir):
    """S2 through the compiled step (its own dims: qk-norm, the normed fast-stack input): every golden request's
    codes, alone and all at once four abreast."""
    fixture = s2_fixture_dir
    engine = FishEngine.load(fixture, device="cpu", precision="float32", compile=True, max_batch_size=4)
    try:
        requests = s2_requests(fixture)
        golden = {r["name"]: np.concatenate(batch_outputs(np.load(fixture / r["file"]), "codes"), axis=1)
                  for r in requests}
        for req in requests:
            np.testing.assert_array_equal(engine.run(as_s2_request(fixture, req, codes=True)).codes,
                                          golden[req["name"]], err_msg=req["name"])
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            results = list(pool.map(engine.run, [as_s2_request(fixture, r, codes=True) for r in requests]))
        assert engine.scheduler.max_seen_batch == 4
        for req, result in zip(requests, results):
            np.testing.assert_array_equal(result.codes, golden[req["name"]], err_msg=req["name"])
    finally:
        engine.close()
