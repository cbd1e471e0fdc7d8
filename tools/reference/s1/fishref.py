"""Loading the reference engine (fish-speech 0.1.0) the way its own entry points do. Shared by run_reference.py and
make_fixture.py; run with the venv that setup.sh builds.

- The dual-AR model goes through `launch_thread_safe_queue`, which calls `DualARTransformer.from_pretrained`.
- The codec goes through `fish_speech.models.dac.inference.load_model(config_name, checkpoint_path, device)`.
  That function composes its hydra config from the package's own `configs/` folder; a checkpoint that brings a
  `codec_config.yaml` (the tiny fixtures do: their codec is smaller than the real `modded_dac_vq`) gets that yaml
  instead, by pointing hydra's `initialize` at the checkpoint folder for the duration of the call. Nothing in the
  installed package is edited.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

CODEC_YAML = "codec_config.yaml"
REAL_CODEC_CONFIG = "modded_dac_vq"


@contextlib.contextmanager
def hydra_configs_from(folder: Path):
    """While active, fish's load_model composes its config from `folder` rather than from the package."""
    from hydra import initialize_config_dir

    import fish_speech.models.dac.inference as dac_inference

    original = dac_inference.initialize

    def initialize(*args, **kwargs):
        return initialize_config_dir(version_base="1.3", config_dir=str(folder.resolve()))

    dac_inference.initialize = initialize
    try:
        yield
    finally:
        dac_inference.initialize = original


def load_codec(checkpoint: Path, device: str = "cpu"):
    """The codec of a checkpoint folder, loaded by fish's `load_model`, then checked against the file: load_model
    loads with strict=False, which would let a mismatched checkpoint through silently."""
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
    unexpected = sorted(set(state) - set(ours))
    wrong = sorted(k for k in set(ours) & set(state) if ours[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise SystemExit(f"{path} does not fit the codec config: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, wrong shape {wrong[:5]}")
    return codec


def load_engine(checkpoint: Path, device: str = "cpu", precision: torch.dtype = torch.float32,
                compile: bool = False):
    """(TTSInferenceEngine, codec) for a checkpoint folder, as fish's own API server builds them."""
    from fish_speech.inference_engine import TTSInferenceEngine
    from fish_speech.models.text2semantic.inference import launch_thread_safe_queue

    llama_queue = launch_thread_safe_queue(checkpoint_path=checkpoint, device=device, precision=precision,
                                           compile=compile)
    codec = load_codec(checkpoint, device)
    engine = TTSInferenceEngine(llama_queue=llama_queue, decoder_model=codec, precision=precision, compile=compile)
    return engine, codec


def tts_request(spec: dict, base: Path | None = None):
    """A ServeTTSRequest from a plain dict: text, optional reference_audio (path) + reference_text, and any of
    the sampling fields. Unlisted fields keep ServeTTSRequest's defaults."""
    from fish_speech.utils.schema import ServeReferenceAudio, ServeTTSRequest

    references = []
    if spec.get("reference_audio"):
        clip = Path(spec["reference_audio"])
        if base is not None and not clip.is_absolute():
            clip = base / clip
        references.append(ServeReferenceAudio(audio=clip.read_bytes(), text=spec.get("reference_text") or ""))
    fields = ("seed", "temperature", "top_p", "repetition_penalty", "max_new_tokens", "chunk_length", "streaming",
              "normalize", "use_memory_cache", "format")
    return ServeTTSRequest(text=spec["text"], references=references, **{k: spec[k] for k in fields if k in spec})
