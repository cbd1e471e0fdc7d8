"""The fish engine end to end: golden requests through the public API, errors, caching, segmentation."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from shoal.engines.base import Reference, SynthesisRequest
from shoal.engines.fish import FishEngine
from shoal.errors import BadRequest, Cancelled, CheckpointError, NotFound
from shoal.testing import S1_MINI_CONFIG, write_tiny_checkpoint

from support import as_request, load_codec_golden, load_golden, load_requests, noise_clip


@pytest.fixture(scope="module")
def engine(fixture_dir):
    return FishEngine.load(fixture_dir, device="cpu", precision="float32")


@pytest.fixture(scope="module")
def golden_requests(fixture_dir):
    return load_requests(fixture_dir)


def test_every_golden_request_gives_the_golden_codes_and_audio(engine, fixture_dir, golden_requests):
    for req in golden_requests:
        g = load_golden(fixture_dir, req)
        result = engine.run(as_request(fixture_dir, req))
        np.testing.assert_array_equal(result.codes, g["codes"], err_msg=req["name"])
        assert result.codes.dtype == np.int64
        assert result.sample_rate == 44100 and result.audio.dtype == np.float32
        assert result.audio.shape == g["audio"].shape
        np.testing.assert_allclose(result.audio, g["audio"], atol=1e-4, rtol=0, err_msg=req["name"])
        assert result.stopped_by_im_end == [req["stopped_by_im_end"]]


def test_a_reference_clip_is_encoded_once_then_served_from_the_cache(engine):
    """The same clip bytes in two requests: one codec encode (a cache miss), then a hit and no encode. Other bytes
    are encoded again, and a saved voice's codes are used as they are."""
    clip, other = noise_clip(1.5, seed=21), noise_clip(1.5, seed=22)  # bytes no other test sends

    def speak(*references: Reference) -> None:
        engine.run(SynthesisRequest(text="Cached.", references=references, seed=1, max_new_tokens=4))

    def counts() -> tuple[int, int, int]:
        return engine.encode_count, engine.reference_cache_misses, engine.reference_cache_hits

    encodes, misses, hits = counts()
    speak(Reference(clip, "Some noise."))
    assert counts() == (encodes + 1, misses + 1, hits)
    speak(Reference(clip, "Some noise."))
    assert counts() == (encodes + 1, misses + 1, hits + 1)
    speak(Reference(other, "Other noise."))
    assert counts() == (encodes + 2, misses + 2, hits + 1)
    codes = engine.encode_reference(Reference(clip, "Some noise.")).numpy()  # a hit
    speak(Reference(None, "Some noise.", codes=codes))
    assert counts() == (encodes + 2, misses + 2, hits + 2)


def test_encode_reference_matches_golden_codes(engine, fixture_dir):
    codes = engine.encode_reference(Reference(fixture_dir / "reference.wav", "x"))
    np.testing.assert_array_equal(codes.numpy(), load_codec_golden(fixture_dir)["codes"])


def relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# Streamed audio goes through an incremental decoder that keeps every module's past, so only float reduction
# order separates it from the one-shot decode (~1e-5 measured). A wrong chunk boundary, a missing frame or a lost
# state (errors of order 1e-1 to 1) fails at once.
STREAM_TOLERANCE = 1e-4
# Codes longer than the codec's block are decoded in pieces with bounded left context: once the context is cut,
# the codec's bf16-rounded RoPE tables make attention depend slightly on absolute position (~1e-3 measured).
# 1e-2 relative L2 is an error 40 dB below the signal.
PIECES_TOLERANCE = 1e-2


@pytest.mark.parametrize("tokens", [20, 48, 120])
def test_synthesize_streams_frame_chunks_matching_the_one_shot_decode(engine, tokens):
    request = SynthesisRequest(text="Streaming, chunk by chunk, frame by frame.", seed=11, max_new_tokens=tokens,
                               chunk_length=0)
    chunks = list(engine.synthesize(request))
    whole = engine.run(request).audio
    assert all(c.dtype == np.float32 for c in chunks)
    assert len(chunks[0]) == engine.codec_stage.first_frames * 2048  # first audio after ~0.5 s worth of frames
    if tokens > 2 * engine.codec_stage.first_frames:
        assert len(chunks) >= 2
    streamed = np.concatenate(chunks)
    assert streamed.shape == whole.shape
    assert relative_l2(streamed, whole) < STREAM_TOLERANCE


def test_a_streamed_request_puts_each_frame_through_the_codec_once(engine):
    request = SynthesisRequest(text="Each frame once.", seed=5, max_new_tokens=120, chunk_length=0)
    before = engine.stats().codec_frames
    chunks = list(engine.synthesize(request))
    decoded = engine.stats().codec_frames - before
    assert len(chunks) >= 3 and decoded == sum(len(c) for c in chunks) // engine.frame_length


def test_golden_requests_in_one_batch_give_the_golden_codes(engine, fixture_dir, golden_requests):
    import concurrent.futures

    requests = [as_request(fixture_dir, r) for r in golden_requests]
    engine.scheduler.max_seen_batch = 0
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(engine.run, requests))
    assert engine.scheduler.max_seen_batch >= 2  # they really decoded side by side
    for req, result in zip(golden_requests, results):
        np.testing.assert_array_equal(result.codes, load_golden(fixture_dir, req)["codes"], err_msg=req["name"])


def test_staggered_arrivals_give_the_golden_codes(engine, fixture_dir, golden_requests):
    import concurrent.futures
    import time

    def delayed(i_req):
        i, req = i_req
        time.sleep(0.03 * i)
        return engine.run(as_request(fixture_dir, req))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(delayed, enumerate(golden_requests)))
    for req, result in zip(golden_requests, results):
        np.testing.assert_array_equal(result.codes, load_golden(fixture_dir, req)["codes"], err_msg=req["name"])


def test_cancel_stops_generation_and_frees_the_slot(engine):
    import threading
    import time

    cancel = threading.Event()
    seen = []

    def progress(done, total):
        seen.append(done)
        if done == 3:
            cancel.set()

    request = SynthesisRequest(text="Stop me.", seed=1, max_new_tokens=400, chunk_length=0)
    assert list(engine.synthesize(request, progress=progress, cancel=cancel)) == []  # cut before the 1st chunk
    deadline = time.monotonic() + 5
    while engine.stats().in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats().in_flight == 0
    assert max(seen) <= 5  # stopped within a step or two, not after 400 frames
    with pytest.raises(Cancelled):
        engine.run(request, cancel=cancel)


def test_same_seed_same_audio_different_seed_different_codes(engine):
    a = engine.run(SynthesisRequest(text="Determinism.", seed=5, max_new_tokens=12))
    b = engine.run(SynthesisRequest(text="Determinism.", seed=5, max_new_tokens=12))
    c = engine.run(SynthesisRequest(text="Determinism.", seed=6, max_new_tokens=12))
    np.testing.assert_array_equal(a.codes, b.codes)
    assert not np.array_equal(a.codes, c.codes)
    assert a.seed == 5


def test_no_seed_draws_a_fresh_one_and_reports_it(engine):
    a = engine.run(SynthesisRequest(text="Random.", max_new_tokens=6))
    again = engine.run(SynthesisRequest(text="Random.", seed=a.seed, max_new_tokens=6))
    np.testing.assert_array_equal(a.codes, again.codes)


def test_seed_is_normalised_like_the_reference():
    assert SynthesisRequest(text="x", seed=-7).effective_seed() == 7
    assert SynthesisRequest(text="x", seed=2**40).effective_seed() == 2**31


def test_long_text_is_generated_in_segments(engine):
    text = "First sentence is here. Second one follows it. Third closes the text."
    result = engine.run(SynthesisRequest(text=text, seed=3, max_new_tokens=6, chunk_length=30))
    assert len(result.stopped_by_im_end) == 3
    assert result.codes.shape[1] * 2048 == result.audio.shape[0]
    whole = engine.run(SynthesisRequest(text=text, seed=3, max_new_tokens=6, chunk_length=0))
    assert len(whole.stopped_by_im_end) == 1


def test_previous_puts_a_segment_in_the_prompt_exactly_as_a_long_text_does(engine, monkeypatch):
    """What a live session sends as its second segment is prompted as the long text's second segment is."""
    prompts = []
    submit = engine.scheduler.submit

    def spy(prompt, *args, **kwargs):
        prompts.append(prompt)
        return submit(prompt, *args, **kwargs)

    monkeypatch.setattr(engine.scheduler, "submit", spy)
    first, second = "First sentence is here.", "Second one follows it."
    whole = engine.run(SynthesisRequest(text=f"{first} {second}", seed=3, max_new_tokens=6, chunk_length=30))
    alone = engine.run(SynthesisRequest(text=first, seed=3, max_new_tokens=6))
    assert np.array_equal(whole.codes[:, :alone.codes.shape[1]], alone.codes)  # segment 1 is the same either way
    carried = engine.run(SynthesisRequest(text=second, seed=5, max_new_tokens=6, previous=(first, alone.codes)))
    engine.run(SynthesisRequest(text=second, seed=5, max_new_tokens=6, previous=(first, alone.codes),
                                condition_on_previous=False))
    plain = engine.run(SynthesisRequest(text=second, seed=5, max_new_tokens=6))
    long_second, _, with_previous, unconditioned, without = prompts[1], prompts[2], prompts[3], prompts[4], prompts[5]
    assert torch.equal(with_previous, long_second)
    assert torch.equal(unconditioned, without) and with_previous.shape[1] > without.shape[1]
    assert not np.array_equal(carried.codes, plain.codes)  # the context changes what is generated


def test_segments_report_their_text_and_bad_previous_codes_are_named(engine):
    from shoal.engines.base import BlockingSink

    sink = BlockingSink()
    engine.submit(SynthesisRequest(text="One. Two is here.", seed=1, max_new_tokens=4, chunk_length=12), sink)
    list(sink)
    assert [s.text for s in sink.segments] == ["One.", "Two is here."]
    with pytest.raises(BadRequest, match="previous codes must be"):
        engine.submit(SynthesisRequest(text="x", previous=("y", np.zeros((2, 3), np.int64))), BlockingSink())
    with pytest.raises(BadRequest, match="previous must be"):
        SynthesisRequest(text="x", previous=("y", [1, 2]))


def test_progress_is_reported_per_frame(engine):
    seen = []
    engine.run(SynthesisRequest(text="Progress.", seed=1, max_new_tokens=8), progress=lambda d, t: seen.append((d, t)))
    assert [d for d, _ in seen] == list(range(1, len(seen) + 1)) and seen[-1][1] >= seen[-1][0]


@pytest.mark.parametrize("kwargs, message", [
    ({"text": ""}, "text is empty"),
    ({"text": "   \n"}, "text is empty"),
    ({"text": "x", "temperature": 0.0}, "temperature"),
    ({"text": "x", "temperature": float("nan")}, "temperature"),
    ({"text": "x", "top_p": 1.5}, "top_p"),
    ({"text": "x", "repetition_penalty": 2.0}, "repetition_penalty"),
    ({"text": "x", "max_new_tokens": 1}, "max_new_tokens"),
    ({"text": "x", "max_new_tokens": -3}, "max_new_tokens"),
    ({"text": "x", "chunk_length": -1}, "chunk_length"),
    ({"text": "x", "seed": 1.5}, "seed"),
    ({"text": "x", "references": (Reference(b"RIFF", ""),)}, "transcript"),
    ({"text": "a\x00b"}, "NUL"),
    ({"text": "lone \ud800 surrogate"}, "surrogate"),
])
def test_bad_requests_are_rejected_with_the_field_named(kwargs, message):
    with pytest.raises(BadRequest, match=message):
        SynthesisRequest(**kwargs)


@pytest.mark.parametrize("audio, error, message", [
    (b"", BadRequest, "empty"),
    (b"this is not audio at all, just text pretending to be a wav file" * 8, BadRequest, "decode"),
])
def test_bad_reference_audio_is_a_bad_request(engine, audio, error, message):
    with pytest.raises(error, match=message):
        engine.run(SynthesisRequest(text="x", references=(Reference(audio, "words"),), seed=1))


def test_references_longer_than_the_limit_or_the_codec_are_bad_requests(fixture_dir):
    limited = FishEngine.load(fixture_dir, device="cpu", max_reference_seconds=2.0)
    with pytest.raises(BadRequest, match="2 s"):
        limited.encode_reference(Reference(noise_clip(3.0), "words", cache=False))
    # The fixture's codec transformers take a bounded number of frames in one piece: past it, a clear 400
    # instead of the codec's ValueError (which was a 500).
    frames = limited.codec.config.quantizer_transformer.block_size
    with pytest.raises(BadRequest, match="longer than this checkpoint's codec"):
        limited.encode_audio(np.zeros(2048 * (frames + 8), np.float32))


def test_missing_reference_file_is_named(engine, tmp_path):
    with pytest.raises(NotFound, match="nope.wav"):
        engine.run(SynthesisRequest(text="x", references=(Reference(tmp_path / "nope.wav", "w"),)))


def test_prompt_longer_than_the_model_allows(engine):
    # max_seq_len 2560 leaves 512 prompt positions; ~4 bytes per token at worst for this tokenizer.
    with pytest.raises(BadRequest, match="prompt"):
        engine.run(SynthesisRequest(text="zq" * 3000, chunk_length=0))


def test_max_seq_len_caps_positions_and_keeps_the_codes(fixture_dir, golden_requests):
    """A cap below the checkpoint's 2560 shortens the RoPE table and the longest prompt; requests that fit give
    the same codes as uncapped."""
    capped = FishEngine.load(fixture_dir, device="cpu", precision="float32", max_seq_len=2200)
    assert capped.model.config.max_seq_len == 2200 and capped.model.rope.shape[0] == 2200
    for req in golden_requests:
        g = load_golden(fixture_dir, req)
        np.testing.assert_array_equal(capped.run(as_request(fixture_dir, req)).codes, g["codes"],
                                      err_msg=req["name"])
    # 152 prompt positions now: a text the uncapped engine takes is refused, naming the cap.
    text = "Hello world, this is a test. " * 12
    assert len(capped.tokenizer.encode(text)) < 512
    with pytest.raises(BadRequest, match="max_seq_len 2200"):
        capped.run(SynthesisRequest(text=text, chunk_length=0, max_new_tokens=4))
    # Full-length caches (the compiled path's static ones) are the cap's length.
    capped.model.setup_caches(batch=1)
    assert capped.model.cache_seq_len == 2200
    # A cap above the checkpoint's changes nothing; one that leaves no room to generate is refused.
    assert FishEngine.load(fixture_dir, device="cpu", max_seq_len=100_000).model.config.max_seq_len == 2560
    with pytest.raises(BadRequest, match="more than 2048"):
        FishEngine.load(fixture_dir, device="cpu", max_seq_len=2048)


@pytest.mark.parametrize("missing", ["codec.pth", "model.pth", "config.json", "tokenizer.tiktoken",
                                     "special_tokens.json"])
def test_incomplete_checkpoint_names_the_missing_file(fixture_dir, tmp_path, missing):
    for f in fixture_dir.iterdir():
        if f.name != missing:
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(CheckpointError, match=f"missing {missing}.*shoal download"):
        FishEngine.load(tmp_path)


def test_missing_checkpoint_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        FishEngine.load(tmp_path / "nowhere")


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    write_tiny_checkpoint(tmp_path, seed=0)
    state = torch.load(tmp_path / "model.pth", weights_only=True)
    state["layers.0.attention.wqkv.weight"] = state["layers.0.attention.wqkv.weight"][:-1]
    del state["norm.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "model.pth")
    with pytest.raises(CheckpointError) as info:
        FishEngine.load(tmp_path)
    text = str(info.value)
    assert "missing: norm.weight" in text and "unexpected: extra.weight" in text and "wqkv" in text


def test_corrupt_weights_file(tmp_path):
    write_tiny_checkpoint(tmp_path, seed=0)
    (tmp_path / "model.pth").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read"):
        FishEngine.load(tmp_path)


def test_lightning_style_checkpoints_load(tmp_path):
    write_tiny_checkpoint(tmp_path, seed=0)
    state = torch.load(tmp_path / "model.pth", weights_only=True)
    torch.save({"state_dict": {"model." + k: v for k, v in state.items()}}, tmp_path / "model.pth")
    assert FishEngine.load(tmp_path).model.config.n_layer == 2


def test_unavailable_device_and_unknown_precision(fixture_dir):
    if not torch.cuda.is_available():
        with pytest.raises(BadRequest, match="cuda"):
            FishEngine.load(fixture_dir, device="cuda")
    with pytest.raises(BadRequest, match="precision"):
        FishEngine.load(fixture_dir, precision="int3")


def test_tiny_checkpoints_are_deterministic_and_usable(tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a", seed=7)
    b = write_tiny_checkpoint(tmp_path / "b", seed=7, n_layer=3)
    for name in ("config.json", "tokenizer.tiktoken", "special_tokens.json", "codec.pth", "model.pth"):
        assert (a / name).is_file()
    engine = FishEngine.load(a)
    assert FishEngine.load(b).model.config.n_layer == 3
    result = engine.run(SynthesisRequest(text="Tiny but real.", seed=1, max_new_tokens=10))
    assert result.audio.shape[0] == result.codes.shape[1] * 2048
    again = write_tiny_checkpoint(tmp_path / "c", seed=7)
    assert (again / "model.pth").read_bytes() == (a / "model.pth").read_bytes()


def test_full_size_s1_mini_builds_on_meta_with_official_key_names(fixture_dir):
    from shoal.fish.dual_ar import DualARConfig, DualARTransformer

    config = DualARConfig.from_dict(S1_MINI_CONFIG)
    with torch.device("meta"):
        model = DualARTransformer(config, 151680, 155775)
    state = model.state_dict()
    tiny = torch.load(fixture_dir / "model.pth", map_location="meta", weights_only=True)

    def pattern(key):  # layer indices aside, names must match the official ones
        return ".".join("N" if part.isdigit() else part for part in key.split("."))

    names = {pattern(k) for k in state}
    tiny_names = {pattern(k) for k in tiny}
    # S1-mini ties the output layer to the embeddings and has no fast qk-norm.
    assert names == (tiny_names - {"output.weight", "fast_layers.N.attention.q_norm.weight",
                                   "fast_layers.N.attention.k_norm.weight"})
    assert sum(1 for k in state if k.startswith("layers.") and k.endswith("wqkv.weight")) == 28
    assert state["embeddings.weight"].shape == (155776, 1024)
    assert state["codebook_embeddings.weight"].shape == (40960, 1024)
    assert state["layers.0.attention.wqkv.weight"].shape == ((16 + 2 * 8) * 128, 1024)
    assert state["layers.0.attention.wo.weight"].shape == (1024, 16 * 128)
    assert state["layers.0.attention.q_norm.weight"].shape == (128,)
    assert state["fast_layers.0.attention.wqkv.weight"].shape == ((16 + 2 * 8) * 64, 1024)
    assert state["fast_output.weight"].shape == (4096, 1024)
    params = sum(v.numel() for v in model.parameters())
    assert 0.4e9 < params - state["embeddings.weight"].numel() < 0.8e9


def test_segments_longer_than_the_codec_block_are_decoded_in_pieces(engine):
    """The tiny codec's transformers take 512 frames at once; a longer segment must still decode, and match
    the one-shot decode of the same codes where one is possible (first 512 frames)."""
    # seed 10 runs 601 frames on the fixture checkpoint (it used to fail with "exceeds block_size 512")
    request = SynthesisRequest(text="Long. " * 20, seed=10, max_new_tokens=700, chunk_length=0, temperature=0.9)
    result = engine.run(request)
    frames = result.codes.shape[1]
    assert frames > engine.codec_stage.decode_limit == 512
    assert result.audio.shape[0] == frames * 2048
    head = engine.codec_stage.decode(result.codes[:, : engine.codec_stage.decode_limit])
    assert relative_l2(result.audio[: len(head)], head) < PIECES_TOLERANCE


def test_streamed_requests_that_arrive_together_decode_in_step_and_share_codec_calls(engine):
    """Rows admitted at one step boundary decode in step, so their streamed chunks go through the codec together;
    each request's audio is still what it gets alone."""
    import threading

    from shoal.engines.base import BlockingSink

    requests = [SynthesisRequest(text=f"Arriving together, number {i}.", seed=30 + i, max_new_tokens=40,
                                 chunk_length=0) for i in range(3)]
    alone = [np.concatenate(list(engine.synthesize(r))) for r in requests]
    before = engine.stats().codec_batches
    gate = threading.Event()
    engine.scheduler.call_soon(lambda: gate.wait(10))  # hold the engine thread until all three are queued
    sinks = [BlockingSink() for _ in requests]
    for request, sink in zip(requests, sinks):
        engine.submit(request, sink)
    gate.set()
    together = [np.concatenate(list(sink)) for sink in sinks]
    assert engine.stats().codec_batches > before
    for one, many in zip(alone, together):
        assert many.shape == one.shape and relative_l2(many, one) < STREAM_TOLERANCE


@pytest.mark.parametrize("latency, frames", [("low", 6), ("balanced", 11), ("normal", 22)])
def test_latency_sets_the_first_streamed_chunk(engine, latency, frames):
    request = SynthesisRequest(text="How soon the audio starts.", seed=11, max_new_tokens=60, chunk_length=0,
                               latency=latency)
    chunks = list(engine.synthesize(request))
    assert len(chunks[0]) == frames * engine.frame_length
    assert np.concatenate(chunks).shape == engine.run(request).audio.shape  # the same audio, cut differently


@pytest.mark.parametrize("condition", [True, False])
def test_condition_on_previous_decides_whether_a_segment_carries_the_last_one(engine, monkeypatch, condition):
    prompted = []
    real = engine._prompt

    def spy(text, references, previous, *args, **kwargs):
        prompted.append([ref_text for ref_text, _ in references + previous])
        return real(text, references, previous, *args, **kwargs)

    monkeypatch.setattr(engine, "_prompt", spy)
    text = "First sentence is here. Second one follows it. Third closes the text."
    engine.run(SynthesisRequest(text=text, seed=3, max_new_tokens=6, chunk_length=30,
                                condition_on_previous=condition))
    if condition:
        assert prompted == [[], ["First sentence is here."], ["Second one follows it."]]
    else:
        assert prompted == [[], [], []]


def test_min_chunk_length_joins_short_segments(engine):
    text = "First sentence is here. Second one follows it. Third closes the text."
    split = engine.run(SynthesisRequest(text=text, seed=3, max_new_tokens=6, chunk_length=30))
    joined = engine.run(SynthesisRequest(text=text, seed=3, max_new_tokens=6, chunk_length=30, min_chunk_length=23))
    assert len(split.stopped_by_im_end) == 3 and len(joined.stopped_by_im_end) == 1
