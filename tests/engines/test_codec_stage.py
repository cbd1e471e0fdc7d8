"""The codec stage on its own: batched pushes give each stream its own audio, each owner's items arrive in order,
and a chunk that fails to decode fails only its owner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shoal.engines.codec_stage import CodecStage
from shoal.fish.codec import CodecConfig, load_codec, push_streams
from support import load_codec_golden

# Batching changes how the codec's sums are split, nothing else: float rounding (2.5e-5 measured; the incremental
# decode's own bound is 1e-4; a wrong state gives errors near 1).
BATCH_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def codec(fixture_dir):
    return load_codec(fixture_dir / "codec.pth", CodecConfig.from_yaml(fixture_dir / "codec_config.yaml"))


@pytest.fixture(scope="module")
def codes(fixture_dir):
    """Two different code streams [10, F] from the reference's golden codec codes."""
    golden = torch.from_numpy(load_codec_golden(fixture_dir)["codes"]).long()
    c = golden[0] if golden.dim() == 3 else golden
    return c, c.flip(-1).contiguous()


def relative_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def test_batched_pushes_give_each_stream_what_it_gets_alone(codec, codes):
    a, b = codes
    alone = [codec.stream(), codec.stream()]
    together = [codec.stream(), codec.stream()]
    for start, end in [(0, 5), (5, 15), (15, 31)]:
        singles = [alone[0].push(a[:, start:end]), alone[1].push(b[:, start:end])]
        batched = push_streams(together, [a[:, start:end], b[:, start:end]])
        for one, many in zip(singles, batched):
            assert one.shape == many.shape and relative_l2(many, one) < BATCH_TOLERANCE
    assert [s.frames for s in together] == [31, 31]


def test_streams_at_different_frames_are_not_batched(codec, codes):
    a, b = codes
    s1, s2 = codec.stream(), codec.stream()
    s1.push(a[:, :3])
    with pytest.raises(ValueError, match="same frame"):
        push_streams([s1, s2], [a[:, 3:6], b[:, :3]])


def frames_of(codes: torch.Tensor) -> list[torch.Tensor]:
    """Engine frames [token, code0..code9] for the codes (the token is unused by the stage)."""
    return [torch.cat([torch.zeros(1, dtype=torch.long), codes[:, i]]) for i in range(codes.shape[1])]


def test_owners_get_their_chunks_in_order_with_equal_shapes_batched(codec, codes):
    failures = []
    stage = CodecStage(codec, stream_first_frames=4, on_error=lambda owner, exc: failures.append((owner, exc)))
    got = {"a": [], "b": []}
    streams = {name: stage.open() for name in got}
    sources = dict(zip(got, codes))
    frames = {name: [] for name in got}
    for i in range(20):
        for name in got:
            frames[name].append(frames_of(sources[name][:, i : i + 1])[0])
            stage.frame_added(name, streams[name], frames[name], got[name].append)
        stage.flush()
    for name in got:
        stage.segment_ended(name, streams[name], frames[name], got[name].append)
        stage.then(name, lambda name=name: got[name].append("end"))
    stage.flush()
    assert not failures and stage.batched_calls >= 2  # same start, same chunk rule: every chunk went together
    for name in got:
        assert got[name][-1] == "end"
        audio = np.concatenate(got[name][:-1])
        one_shot = codec.decode(sources[name][:, :19]).numpy()  # all frames but the last
        assert relative_l2(audio, one_shot) < 1e-4
    assert stage.frames == 2 * 19 and not stage.pending


def test_a_chunk_that_fails_to_decode_fails_only_its_owner(codec, codes):
    failures = []
    stage = CodecStage(codec, stream_first_frames=4, on_error=lambda owner, exc: failures.append(owner))
    good, bad = stage.open(), stage.open()
    delivered = {"good": [], "bad": []}
    good_frames = frames_of(codes[0][:, :6])
    bad_frames = frames_of(codes[1][:, :6])
    bad_frames[2] = bad_frames[2].clone()
    bad_frames[2][1:] = -1  # negative codes: the codec refuses them
    stage.frame_added("good", good, good_frames, delivered["good"].append)
    stage.frame_added("bad", bad, bad_frames, delivered["bad"].append)
    stage.then("bad", lambda: delivered["bad"].append("end"))
    stage.flush()
    assert failures == ["bad"] and delivered["bad"] == []  # its later items were dropped too
    assert len(delivered["good"]) == 1 and len(delivered["good"][0]) == 5 * codec.config.frame_length
