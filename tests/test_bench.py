"""`shoal bench` as a user runs it (a real subprocess writing real result files), plus the pieces of it that
need no model: attributing the reference's frame timings, and the full-size tokenizer's layout.

Benchmarks are not tests: nothing here checks a speed, only that the numbers exist and make sense.
"""

from __future__ import annotations

import json
import shutil

import pytest

from shoal import bench
from shoal.errors import CheckpointError

from support import shoal


# About 17 s on 2 quiet cores (four fresh processes, each loading the model), so not marked slow.
def test_bench_writes_the_table_and_the_json(fixture_dir, tmp_path):
    proc = shoal("bench", "--tiny", "--fixture", str(fixture_dir), "--no-reference", "--tokens", "8",
                 "--concurrency", "1,2", "--out", str(tmp_path), "--label", "test", "--bandwidth-mib", "64",
                 "--max-seq-len", "2400", timeout=600)
    assert proc.returncode == 0, proc.stderr
    [md] = tmp_path.glob("*-test.md")
    [js] = tmp_path.glob("*-test.json")
    assert md.name[:4].isdigit() and md.stem == js.stem
    assert proc.stdout.strip() == md.read_text().strip()  # the table goes to stdout too
    assert all(line.startswith("bench: ") for line in proc.stderr.splitlines())  # progress on stderr

    report = json.loads(js.read_text())
    m = report["machine"]
    assert m["cores"] >= 1 and m["cpu"] and m["ram_gib"] > 0
    assert report["options"] == {"tokens": 8, "concurrency": [1, 2], "threads": None, "device": "cpu",
                                 "precision": "float32", "compile": False, "cuda_graphs": False, "max_seq_len": 2400,
                                 "max_batch_size": None, "quantize": "none", "one_process": False}
    assert report["bandwidth"]["gbps"] > 0 and report["floor"]["floor_s"] > 0

    s = report["shoal"]
    assert s["torch"] and s["threads"] >= 1 and s["device"] == "cpu" and s["precision"] == "float32"
    single = s["single"]
    assert single["load_s"] > 0 and single["max_seq_len"] == 2400  # capped below the fixture's 2560
    d = single["decode"]
    assert d["steps"] >= 1 and d["median_step_s"] > 0 and d["frames"] == d["steps"] + 1 <= 8
    assert single["decode_bytes"]["weights"] > 0
    u = single["utterance"]
    assert 0 < u["first_audio_s"] <= u["total_s"] and 1 <= u["tokens"] <= 7 and u["audio_s"] > 0
    assert u["unstreamed_total_s"] > 0 and u["codec_frames"] == u["tokens"]  # each decoded frame through once
    v = single["voice"]
    assert v["encodes_at_save"] == 1 and v["encodes_first_request"] == 0 and v["encodes_second_request"] == 0
    assert v["second_request_s"] > 0
    # Per-process peaks: a tiny model stays far below the orchestrator's bandwidth arrays and torch's CPU share
    assert 50 < single["peak_rss_mb"] < 2000

    assert set(s["concurrency"]) == {"1", "2"}
    for n, c in s["concurrency"].items():
        assert len(c["per_request_tokens"]) == int(n) == len(c["latencies_s"])
        assert all(1 <= t <= 7 for t in c["per_request_tokens"]) and c["tokens"] == sum(c["per_request_tokens"])
        assert c["wall_s"] > 0 and c["tokens_per_s"] > 0 and c["audio_s_per_s"] > 0 and c["peak_rss_mb"] > 50

    assert report["reference"] == {"status": "not run (--no-reference)"}
    rows = {row["metric"]: row for row in report["summary"]}
    assert rows["saved voice, 2nd request: codec encodes"]["shoal"] == 0
    assert rows["utterance: streamed total / unstreamed total"]["shoal"] > 0
    assert all(row["reference"] is None and row["ratio"] is None for row in report["summary"])
    text = md.read_text()
    assert "| model load | s |" in text and "not run" in text and "max_seq_len 2400" in text and "throughput, 2 concurrent" in text


@pytest.mark.parametrize("flags, says", [
    (["--concurrency", "1,0"], "--concurrency"),
    (["--tokens", "1"], "--tokens"),
    (["--label", "a/b"], "--label"),
    (["--max-seq-len", "2048"], "--max-seq-len"),
])
def test_bad_options_are_one_line(flags, says, tmp_path):
    proc = shoal("bench", "--no-reference", "--out", str(tmp_path), *flags, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and lines[0].startswith("shoal: error:")


def test_a_missing_checkpoint_is_one_line(tmp_path):
    proc = shoal("bench", "--checkpoint", str(tmp_path / "nope"), "--no-reference", "--out", str(tmp_path),
                 timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and "Traceback" not in proc.stderr


def test_reference_steps_and_encodes_come_from_its_stderr():
    # Two requests as the reference logs them: the second encodes a clip first (before its "set seed").
    log = [
        (0.0, "2026-01-01 00:00:00.000 | WARNING  | fish_speech.inference_engine:inference:62 - set seed: 100"),
        (0.1, "2026-01-01 00:00:00.100 | INFO     | fish_speech...:generate_long:420 - Encoded text: Hello"),
        (0.5, "  0%|          | 0/4 [00:00<?, ?it/s]"),
        (1.5, " 25%|##5       | 1/4 [00:01<00:03,  1.00s/it]"),
        (3.5, " 75%|#######5  | 3/4 [00:03<00:01,  1.00s/it]"),
        (3.5, " 75%|#######5  | 3/4 [00:03<00:01,  1.00s/it]"),  # tqdm's closing redraw
        (4.0, "2026-01-01 00:00:04.000 | INFO     | ...:decode_vq_tokens:20 - VQ features: torch.Size([10, 4])"),
        (5.0, "2026-01-01 00:00:05.000 | INFO     | ...:encode_reference:45 - Loaded audio with 3.00 seconds"),
        (5.75, "2026-01-01 00:00:05.750 | INFO     | ...:encode_reference:51 - Encoded prompt: torch.Size([10, 65])"),
        (6.0, "2026-01-01 00:00:06.000 | WARNING  | fish_speech.inference_engine:inference:62 - set seed: 11"),
        (6.0, "2026-01-01 00:00:06.000 | INFO     | ...:generate_long:420 - Encoded text: Saved voices"),
        (7.0, "  0%|          | 0/1 [00:00<?, ?it/s]"),
        (7.25, "100%|##########| 1/1 [00:00<00:00,  4.00it/s]"),
    ]
    first, second = bench.parse_reference_log(log)
    assert first["steps"] == [1.0, 1.0, 1.0] and first["encodes"] == 0  # one gap spanning 2 steps: 2 x 1.0 s
    assert first["prefill_s"] == pytest.approx(0.4)
    assert second["steps"] == [0.25] and second["encodes"] == 1 and second["encode_s"] == [0.75]


def test_tqdm_redraws_are_stamped_when_they_arrive_not_when_the_next_one_does():
    stamper = bench.LineStamper()
    assert stamper.feed(b"log line\n\r  0%| 0/4 [", 1.0) == [(1.0, "log line")]
    assert stamper.feed(b"\r 50%| 2/4 [", 2.0) == [(1.0, "  0%| 0/4 [")]
    assert stamper.feed(b"\r100%| 4/4 [\n", 3.0) == [(2.0, " 50%| 2/4 ["), (3.0, "100%| 4/4 [")]
    assert stamper.feed(b"partial", 4.0) == [] and stamper.feed(b" line\n", 5.0) == [(5.0, "partial line")]
    assert stamper.feed(b"no newline at the end", 6.0) == [] and stamper.close(7.0) == [(6.0, "no newline at the end")]


def test_the_orchestrator_checks_each_kind_s_files(tmp_path, fixture_dir, s2_fixture_dir):
    """The orchestrator finds a checkpoint's kind and its files as the loader does: S2's shards from its index."""
    bench.check_checkpoint(fixture_dir)
    bench.check_checkpoint(s2_fixture_dir)
    broken = tmp_path / "s2"
    shutil.copytree(s2_fixture_dir, broken)
    shard = sorted(broken.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        bench.check_checkpoint(broken)


def test_full_size_s2_tokenizer_and_config_agree_with_s2_pro_s_ids(tmp_path):
    """The random S2-Pro-shaped checkpoint's tokenizer puts <|im_end|> and the semantic tokens where the real one
    has them, and the loader accepts it with the published config (the weights, 9 GB, are not written here)."""
    from shoal.fish.checkpoint import check_vocabulary
    from shoal.fish.dual_ar import DualARConfig
    from shoal.fish.tokenizer_s2 import S2Tokenizer
    from shoal.testing import S2_PRO_BPE_SIZE, S2_PRO_CONFIG, S2_PRO_SPEAKERS, write_tiny_s2_tokenizer

    write_tiny_s2_tokenizer(tmp_path, bpe_size=S2_PRO_BPE_SIZE, speakers=S2_PRO_SPEAKERS)
    tok = S2Tokenizer.from_dir(tmp_path)
    assert (tok.im_end_id, tok.semantic_begin_id, tok.semantic_end_id) == (151645, 151678, 155773)
    assert tok.encode("Hello") == S2Tokenizer.from_dir(write_tiny_s2_tokenizer_dir(tmp_path / "tiny")).encode("Hello")
    check_vocabulary(DualARConfig.from_dict(S2_PRO_CONFIG), tok, "s2")


def write_tiny_s2_tokenizer_dir(directory):
    from shoal.testing import write_tiny_s2_tokenizer

    directory.mkdir()
    write_tiny_s2_tokenizer(directory)
    return directory


def test_full_size_tokenizer_puts_the_semantic_tokens_at_the_real_ids():
    from shoal.fish.tokenizer import FishTokenizer
    from shoal.testing import CONTROL_TOKENS, S1_MINI_CONFIG, SEMANTIC_TOKENS, full_size_ranks

    ranks = full_size_ranks()
    assert len(set(ranks)) == len(ranks) == 151665 and ranks[:256] == [bytes([b]) for b in range(256)]
    specials = list(CONTROL_TOKENS) + [f"<|semantic:{i}|>" for i in range(SEMANTIC_TOKENS)]
    tok = FishTokenizer({r: i for i, r in enumerate(ranks)}, specials)
    assert tok.vocab_size == S1_MINI_CONFIG["vocab_size"] == 155776
    assert (tok.semantic_begin_id, tok.semantic_end_id) == (151680, 155775)
    assert tok.decode(tok.encode("Hello there, world.")) == "Hello there, world."


def test_quick_bench_runs_shoal_alone_on_the_tiny_fixture(fixture_dir, tmp_path):
    """`shoal bench --quick`, as CI runs it so the bench cannot rot."""
    proc = shoal("bench", "--quick", "--fixture", str(fixture_dir), "--out", str(tmp_path), "--bandwidth-mib", "64",
                 timeout=300)
    assert proc.returncode == 0, proc.stderr
    [js] = tmp_path.glob("*-quick.json")
    report = json.loads(js.read_text())
    assert report["options"]["tokens"] == 16 and report["options"]["concurrency"] == [1, 4]
    assert report["reference"]["status"] == "not run (--no-reference)"
    assert report["shoal"]["single"]["decode"]["median_step_s"] > 0


# Two `shoal serve` processes on the tiny fixture, 3 short requests each: about 40 s on 2 quiet cores.
def test_repeat_sends_one_request_to_a_default_and_a_one_thread_server(fixture_dir, tmp_path):
    proc = shoal("bench", "--repeat", "3", "--tiny", "--fixture", str(fixture_dir), "--tokens", "8",
                 "--out", str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr
    [md] = tmp_path.glob("*-tiny-repeat.md")
    [js] = tmp_path.glob("*-tiny-repeat.json")
    assert md.stem == js.stem and all(line.startswith("bench: ") for line in proc.stderr.splitlines())

    report = json.loads(js.read_text())
    assert report["mode"] == "repeat" and report["options"]["repeat"] == 3 and report["options"]["tokens"] == 8
    body = report["request"]["body"]
    assert body["seed"] == bench.UTTERANCE_SEED and body["max_new_tokens"] == 8 and body["streaming"] is False
    assert set(report["servers"]) == {"default", "omp1"}
    assert report["servers"]["omp1"]["env"] == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for name, server in report["servers"].items():
        assert server["exit_code"] == 0 and server["ready_s"] > 0
        if name == "omp1":  # what torch chooses with the server's environment
            assert server["torch_probe"]["intra_op_threads"] == 1
        assert len(server["requests"]) == 3
        for r in server["requests"]:
            assert r["wall_s"] > 0 and r["cpu_s"] >= 0 and r["threads"] >= 1 and 0 < r["audio_s"] < 1
            assert r["bytes"] > 44 and len(r["sha256"]) == 64 and len(r["thread_cpu_s"]) <= 6
        f = server["figures"]
        assert f["identical"] and f["distinct_responses"] == 1  # same seed, same request: the same WAV
        assert len(f["later_over_first"]) == 2 and f["later_over_first_min"] <= f["later_over_first_max"]
    assert [t["target"] for t in report["targets"]] == ["first vs later ±10%", "CPU per request ≤ OMP_NUM_THREADS=1"]
    assert all(isinstance(t["hit"], bool) for t in report["targets"])
    assert report["ratios"]["cpu_default_over_omp1"] > 0 and report["ratios"]["wall_default_over_omp1"] > 0

    text = md.read_text()
    assert proc.stdout.strip() and proc.stdout.strip() in text  # the summary printed is the head of the file
    assert "first vs later ±10%: " in proc.stdout and "CPU per request ≤ OMP_NUM_THREADS=1: " in proc.stdout
    assert "DIFFER" not in text and text.count("\n| 3 | ") == 1  # one row per request


@pytest.mark.parametrize("flags, says", [
    (["--repeat", "1"], "--repeat"),
    (["--repeat", "--concurrency", "1,4"], "--concurrency"),
    (["--repeat", "3", "--one-process"], "--one-process"),
    (["--live", "--concurrency", "1,4"], "--concurrency"),
    (["--live", "--repeat", "3"], "--repeat"),
    (["--replicas", "0"], "--replicas"),
    (["--replicas", "1,two"], "--replicas"),
    (["--replicas", "1,2", "--live"], "--live"),
    (["--replicas", "1,2", "--one-process"], "--one-process"),
    (["--wyoming"], "--wyoming-piper-python"),
    (["--wyoming", "--wyoming-piper-python", "python3", "--wyoming-rounds", "0"], "--wyoming-rounds"),
])
def test_bad_repeat_live_and_replicas_options_are_one_line(flags, says, tmp_path):
    proc = shoal("bench", "--out", str(tmp_path), *flags, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and lines[0].startswith("shoal: error:")


# -- --live ---------------------------------------------------------------------------------------------------------

def test_live_figures_come_from_the_segments_timings():
    from shoal.bench_live import summarise_session

    rate = 1000
    sent = [0.5, 1.0]  # sentence 0 flushed at 0.5 s, sentence 1 at 1.0 s
    audio = [(0.8, 0, 500), (1.1, 0, 500), (1.9, 1, 1000)]  # (arrival, segment, samples)
    s = summarise_session(sent, audio, rate)
    assert s["flush_to_first_audio_s"] == pytest.approx([0.3, 0.9])
    assert s["gap_between_segments_s"] == pytest.approx([0.8])
    # played from 0.8: chunk 2 due at 1.3 (arrived 1.1, no stall), chunk 3 due at 1.8, arrived 1.9: 0.1 s stall
    assert s["playback_stall_s"] == pytest.approx(0.1)
    assert s["audio_s"] == 2.0 and s["session_s"] == 1.9


def test_live_figures_need_every_segment_marked():
    from shoal.bench_live import summarise_session

    with pytest.raises(RuntimeError, match="segments 0..1"):
        summarise_session([0.5, 1.0], [(0.8, -1, 500)], 1000)


# One `shoal serve` on the tiny fixture, a warm-up then 3 live sessions and 6 HTTP streams of 8 tokens each.
def test_live_bench_writes_its_table_and_json(fixture_dir, tmp_path):
    proc = shoal("bench", "--live", "--tiny", "--fixture", str(fixture_dir), "--tokens", "8", "--out", str(tmp_path),
                 timeout=600)
    assert proc.returncode == 0, proc.stderr
    [md] = tmp_path.glob("*-tiny-live.md")
    [js] = tmp_path.glob("*-tiny-live.json")
    report = json.loads(js.read_text())
    summary = report["summary"]
    assert summary["live_first_sentence_flush_to_first_audio_s"]["n"] == 3
    assert summary["live_later_sentences_flush_to_first_audio_s"]["n"] == 6
    assert summary["live_gap_between_segments_s"]["n"] == 6
    assert all(d["min"] > 0 for name, d in summary.items() if "first_audio" in name)
    for run in report["runs"]:
        assert run["live"]["audio_s"] > 0 and len(run["live"]["flush_to_first_audio_s"]) == 3
    assert "flush → first audio" in md.read_text()


# -- --wyoming ------------------------------------------------------------------------------------------------------

def test_wyoming_report_names_each_target_met_or_missed():
    from shoal.bench_wyoming import render_markdown

    def result(ttft, total):
        stat = lambda v: {"mean": v, "median": v, "min": v, "max": v}  # noqa: E731
        return {"runs": 1, "ok": 1, "errors": [], "ttft_s": stat(ttft), "total_s": stat(total), "rtf": stat(0.1),
                "audio_s": stat(5.0)}

    report = {"started": "2026-12-08T00:00:00+00:00", "voice": "/x/en_US-joe-medium.onnx", "rounds": 1,
              "texts": ["a"], "versions": {"wyoming-bench": "x"},
              "machine": {"cpu": "cpu", "cores": 2, "platform": "linux", "python": "3.11"},
              "results": {"shoal": {"streaming": result(0.3, 0.9)}, "wyoming-piper": {"streaming": result(0.2, 0.7)}},
              "targets": {"streaming_first_audio_ratio": 1.5, "streaming_first_audio_met": False,
                          "streaming_total_ratio": 0.9 / 0.7, "streaming_total_met": False}}
    text = render_markdown(report)
    assert "| shoal | streaming | 1/1 | 300 (300) | 900 (900) |" in text
    assert "first audio: shoal / wyoming-piper = 1.50 (target <= 1.00): MISSED" in text
    assert "total time: shoal / wyoming-piper = 1.29 (target <= 1.20): MISSED" in text
