"""Loading the S2 reference engine (fish-speech 2.0.0) the way its own API server does. Used by make_fixture.py;
run with the venv that setup.sh builds.

- The dual-AR model goes through `launch_thread_safe_queue`, whose worker calls `init_model` ->
  `DualARTransformer.from_pretrained(..., load_weights=True)`. `load_engine` also hands back that model object
  (captured by wrapping `init_model` for the duration of the launch), so that the harness can run teacher-forced
  passes on it while the worker thread is idle.
- The codec goes through `fish_speech.models.dac.inference.load_model(config_name, checkpoint_path, device)`, as
  `tools/server/model_manager.py` loads it. A checkpoint that brings a `codec_config.yaml` gets that yaml, through
  the S1 harness's `hydra_configs_from` (hydra pointed at the checkpoint folder for the duration of the call).
  `load_model` loads with strict=False, so the result is checked against the file here.
Nothing in the installed package is edited.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "s1"))
from fishref import CODEC_YAML, REAL_CODEC_CONFIG, hydra_configs_from  # noqa: E402  (the S1 harness)


def non_persistent_buffers(module: torch.nn.Module) -> set[str]:
    """Qualified names of the buffers a module leaves out of its state_dict."""
    names = set()
    for prefix, sub in module.named_modules():
        for name in sub._non_persistent_buffers_set:
            names.add(f"{prefix}.{name}" if prefix else name)
    return names


def load_codec(checkpoint: Path, device: str = "cpu"):
    """(codec, ignored_keys): the codec of a checkpoint folder loaded by fish's `load_model`, checked against the
    file: every state_dict entry of the codec must come from the file with the same shape and value. Keys of the
    file that the codec does not take are returned; they may only be buffers the codec keeps out of its
    state_dict (fish 2.0 made the codec transformers' `freqs_cis` and `causal_mask` non-persistent)."""
    from fish_speech.models.dac.inference import load_model

    path = checkpoint / "codec.pth"
    if (checkpoint / CODEC_YAML).is_file():
        with hydra_configs_from(checkpoint):
            codec = load_model(Path(CODEC_YAML).stem, str(path), device=device)
    else:
        codec = load_model(REAL_CODEC_CONFIG, str(path), device=device)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    if any("generator." in k for k in state):
        state = {k.replace("generator.", ""): v for k, v in state.items() if "generator." in k}
    ours = codec.state_dict()
    missing = sorted(set(ours) - set(state))
    wrong = sorted(k for k in set(ours) & set(state)
                   if ours[k].shape != state[k].shape or not torch.equal(ours[k].cpu(), state[k].to(ours[k].dtype)))
    ignored = sorted(set(state) - set(ours))
    stray = sorted(set(ignored) - non_persistent_buffers(codec))
    if missing or wrong or stray:
        raise SystemExit(f"{path} does not fit the codec config: missing {missing[:5]}, wrong {wrong[:5]}, "
                         f"unexpected {stray[:5]}")
    return codec, ignored


def load_engine(checkpoint: Path, device: str = "cpu", precision: torch.dtype = torch.float32,
                compile: bool = False):
    """(TTSInferenceEngine, codec, model) for a checkpoint folder, as fish's own API server builds them; `model` is
    the DualARTransformer the generation worker thread uses."""
    import fish_speech.models.text2semantic.inference as t2s
    from fish_speech.inference_engine import TTSInferenceEngine

    captured = {}
    original = t2s.init_model

    def init_model(*args, **kwargs):
        model, decode_one_token = original(*args, **kwargs)
        captured["model"] = model
        return model, decode_one_token

    t2s.init_model = init_model
    try:
        llama_queue = t2s.launch_thread_safe_queue(checkpoint_path=checkpoint, device=device, precision=precision,
                                                   compile=compile)
    finally:
        t2s.init_model = original
    codec, _ = load_codec(checkpoint, device)
    engine = TTSInferenceEngine(llama_queue=llama_queue, decoder_model=codec, precision=precision, compile=compile)
    return engine, codec, captured["model"]


def tts_request(text: str, references: list[tuple[Path, str]], **fields):
    """A ServeTTSRequest: the text, (clip path, transcript) references sent as bytes, and any other field."""
    from fish_speech.utils.schema import ServeReferenceAudio, ServeTTSRequest

    refs = [ServeReferenceAudio(audio=Path(clip).read_bytes(), text=transcript) for clip, transcript in references]
    return ServeTTSRequest(text=text, references=refs, **fields)
