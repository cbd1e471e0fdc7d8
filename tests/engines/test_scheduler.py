"""The BatchScheduler on its own: golden frames through it, contiguous slots, and faults raised inside the batched
decode step, isolated to the row that has them."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from shoal.engines.scheduler import BatchScheduler
from shoal.fish.checkpoint import load_dual_ar
from shoal.fish.sampling import SamplingParams
from shoal.fish.tokenizer import FishTokenizer

from support import load_golden, load_requests


@pytest.fixture(scope="module")
def tokenizer(fixture_dir):
    return FishTokenizer.from_dir(fixture_dir)


@pytest.fixture(scope="module")
def model(fixture_dir, tokenizer):
    return load_dual_ar(fixture_dir, tokenizer, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def goldens(fixture_dir, tokenizer):
    """(prompt, params, seed, max_new_tokens, generated frames, <|im_end|> id) of every golden request."""
    out = []
    for req in load_requests(fixture_dir):
        g = load_golden(fixture_dir, req)
        params = SamplingParams(req["temperature"], req["top_p"], req["repetition_penalty"])
        out.append((torch.from_numpy(g["prompt"]), params, req["seed"], req["max_new_tokens"], g["generated"],
                    tokenizer.im_end_id))
    return out


@pytest.fixture
def scheduler(model):
    s = BatchScheduler(model, max_batch=4)
    yield s
    s.stop()


def submit(scheduler, golden, fault=None):
    prompt, params, seed, max_new, _, im_end = golden
    return scheduler.submit(prompt, params, torch.Generator().manual_seed(seed), max_new, im_end, fault=fault)


def collect(rows):
    """Each row's frames `[11, n]` (or its exception), read concurrently as the engine's consumers do."""
    results = [None] * len(rows)

    def read(i):
        try:
            results[i] = torch.stack(list(rows[i]), dim=1).numpy()
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            results[i] = exc

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(rows))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_every_golden_request_gives_its_golden_frames_alone_and_together(scheduler, goldens):
    for golden in goldens:
        (frames,) = collect([submit(scheduler, golden)])
        np.testing.assert_array_equal(frames, golden[4])
    results = collect([submit(scheduler, g) for g in goldens])
    assert scheduler.max_seen_batch >= 2
    for golden, frames in zip(goldens, results):
        np.testing.assert_array_equal(frames, golden[4])
    assert scheduler.in_flight == 0 and scheduler.batch.n == 0


def test_rows_leaving_keep_the_others_in_contiguous_slots(scheduler, goldens):
    """Rows stop at different frames; the slots of those still decoding stay 0..n-1 after every departure."""
    seen = []
    original = scheduler._retire

    def watching_retire():
        original()
        seen.append(sorted(row.slot for row in scheduler._active))

    scheduler._retire = watching_retire
    results = collect([submit(scheduler, g) for g in goldens])
    assert all(slots == list(range(len(slots))) for slots in seen)
    assert len({len(s) for s in seen}) >= 3  # the batch really shrank while others went on
    for golden, frames in zip(goldens, results):
        np.testing.assert_array_equal(frames, golden[4])


def raising(exc_type, when=lambda rows: True):
    def fault(produced, rows):
        if produced >= 2 and when(rows):
            raise exc_type("injected inside the decode step")
    return fault


def test_an_exception_inside_the_batched_step_fails_only_its_row(scheduler, goldens):
    faulty = 1
    rows = [submit(scheduler, g, fault=raising(RuntimeError) if i == faulty else None)
            for i, g in enumerate(goldens)]
    results = collect(rows)
    assert isinstance(results[faulty], RuntimeError)
    assert scheduler.isolated_faults >= 1  # the batched step failed and was replayed row by row
    for i, (golden, frames) in enumerate(zip(goldens, results)):
        if i != faulty:
            np.testing.assert_array_equal(frames, golden[4], err_msg=f"row {i}")
    assert scheduler.in_flight == 0


def test_out_of_memory_in_a_batch_halves_it_and_every_row_keeps_its_frames(scheduler, goldens):
    oom = torch.cuda.OutOfMemoryError
    rows = [submit(scheduler, g, fault=raising(oom, when=lambda n: n > 1) if i == 0 else None)
            for i, g in enumerate(goldens)]
    results = collect(rows)
    assert scheduler.isolated_faults >= 1
    for golden, frames in zip(goldens, results):
        np.testing.assert_array_equal(frames, golden[4])


def test_out_of_memory_of_a_single_row_fails_it_alone(scheduler, goldens):
    oom = torch.cuda.OutOfMemoryError
    rows = [submit(scheduler, g, fault=raising(oom) if i == 2 else None) for i, g in enumerate(goldens)]
    results = collect(rows)
    assert isinstance(results[2], oom)
    for i in (0, 1, 3):
        np.testing.assert_array_equal(results[i], goldens[i][4])


def test_cancelled_rows_free_their_slots(scheduler, goldens):
    rows = [submit(scheduler, g) for g in goldens]
    for row in rows[:2]:
        row.cancel()
    results = collect(rows)
    for i in (2, 3):
        np.testing.assert_array_equal(results[i], goldens[i][4])
    assert scheduler.in_flight == 0 and scheduler.batch.n == 0


def test_a_failure_that_does_not_happen_again_when_replayed_fails_no_row(scheduler, goldens):
    """A transient fault (raised once, inside a batched step) is replayed away: every row keeps its frames."""
    fired = []

    def once(produced, rows):
        if produced >= 2 and rows > 1 and not fired:
            fired.append(rows)
            raise RuntimeError("transient, injected inside the decode step")

    results = collect([submit(scheduler, g, fault=once if i == 0 else None) for i, g in enumerate(goldens)])
    assert fired and scheduler.isolated_faults >= 1
    for golden, frames in zip(goldens, results):
        np.testing.assert_array_equal(frames, golden[4])
