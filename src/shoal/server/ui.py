"""The web UI: a Gradio app mounted at `/`, on the same app and port as the API.

## Web UI

`shoal serve` also serves a web UI at its root, e.g. http://127.0.0.1:8080/ (`--no-ui` or `SHOAL_UI=false`
turns it off; the API is unaffected). **Speak** streams speech into the player as it is generated: pick the
model and a saved voice, open *Advanced settings* for the seed and sampling settings, and download the result
in any output format; the last ten results of the browser tab stay playable beside it. **Clone** takes a
reference clip, uploaded or recorded with the microphone, and its transcript, previews the voice and saves it
under a name. **Voices** lists the saved voices, and plays, renames and deletes them. The header says which
engine serves, from which checkpoint, on which device and at which precision, and how many requests are
queued; when no checkpoint was found it says that the lite voice is standing in and that `shoal download`
fixes it. With `--api-key KEY` the UI asks for a login once per browser: any (non-empty) username, and the key
as the password. The UI runs inside the server process and calls the same service layer as the API, so it
shares its queue, limits and voice library. Streaming into the player needs the `ffmpeg` program on PATH
(Debian/Ubuntu: `apt install ffmpeg`); without it the player gets each result when it is complete. Scripts can
call the UI with `gradio_client` too: `Client("http://127.0.0.1:8080/").predict("Hello!", api_name="/speak")`
returns the path of an audio file (pass `auth=("me", KEY)` to `Client` when a key is set), but the HTTP API is
the stable interface.
"""

from __future__ import annotations

import asyncio
import atexit
import hmac
import logging
import shutil
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import soundfile as sf
from fastapi import FastAPI
from starlette.routing import Match, Mount

from shoal import __version__
from shoal.audio import FORMATS, encode_audio
from shoal.errors import BadRequest, ShoalError, Unavailable
from shoal.params import CHUNK_LENGTH, MAX_NEW_TOKENS, REPETITION_PENALTY, SPEED, TEMPERATURE, TOP_P, Param
from shoal.server.errors import MODEL_PREFIX
from shoal.service import DEFAULT_VOICE, Service, SpeechParams
from shoal.voices import ID_RULE

log = logging.getLogger("shoal.ui")

#: Results kept per browser tab in the Speak tab's history.
HISTORY_SIZE = 10
#: Files the UI wrote (downloads, history clips) live this long and this many, whichever ends first.
FILE_MAX_AGE = 3600.0
FILE_MAX_COUNT = 200
#: How often a page polls while the engines load.
LOADING_POLL_SECONDS = 2.0
MODEL_LABELS = {"s1": "s1 · Fish Speech S1 (clones voices)",
                "s2-pro": "s2-pro · Fish Audio S2-Pro (clones voices; speakers and [tags])",
                "piper": "piper · lite voice (no cloning)"}
#: Settings that mean nothing to piper (a VITS model samples no tokens): greyed out while it is picked.
FISH_ONLY = ("top_p", "repetition_penalty", "max_new_tokens", "chunk_length")
#: Of those, what each other model ignores too: S2-Pro samples with no repetition penalty (as fish-speech 2.0).
IGNORED_BY = {"piper": set(FISH_ONLY), "s2-pro": {"repetition_penalty"}}
#: Shown under the text while S2-Pro is picked: its inline syntax.
S2_HELP = ("**S2-Pro syntax.** Free-form tags in square brackets steer the delivery where they stand: "
           "`[whisper]`, `[laughing]`, `[pitch up]`, `[professional broadcast tone]`. For a dialogue, start each "
           "turn with a speaker tag, `<|speaker:0|>Hi! <|speaker:1|>Hello.`; speaker *i* speaks in the voice of "
           "the voice's clip *i* (a saved voice with two clips gives two speakers).")


def slider(param: Param, label: str, **kwargs) -> gr.Slider:
    """A control for one request parameter, limited to what the API accepts (shoal.params)."""
    low, high = param.ui_range
    return gr.Slider(low, high, value=param.default, step=param.step, label=label, **kwargs)


EXAMPLES = [
    "Hello! This is shoal, a self-hosted voice server. It speaks as it thinks, one sentence at a time.",
    "The quick brown fox jumps over the lazy dog. Then it takes a well-earned nap in the afternoon sun.",
    "Good morning. Your train to Edinburgh departs from platform four at nine fifteen.",
]
#: Paths the API owns even where none of its routes match: a wrong method or an unknown /v1 or /model path gets
#: the API's JSON 405/404, not the UI's page.
API_PATHS = ("/v1", MODEL_PREFIX, "/docs", "/redoc", "/openapi.json", "/metrics")
PREVIEW_TEXT = "Hello! This is how I sound when shoal borrows my voice."

CSS = """
#shoal-header { padding: 10px 16px; border-radius: var(--radius-lg); background: var(--background-fill-secondary);
                border: 1px solid var(--border-color-primary); }
#shoal-header p { margin: 0; }
#shoal-header h1 { font-size: 1.5rem; margin: 0 0 2px 0; }
.shoal-notice { padding: 10px 16px; border-radius: var(--radius-lg); border: 1px solid #f59e0b;
                background: #fffbeb; color: #78350f; }
.dark .shoal-notice { background: #451a03; color: #fde68a; }
.shoal-notice p { margin: 0.2em 0; }
.shoal-status p { margin: 0.2em 0; }
#shoal-count { text-align: right; opacity: 0.7; font-size: var(--text-sm); }
#shoal-count p { margin: 0; }
#shoal-stats { font-variant-numeric: tabular-nums; }
#shoal-refresh { max-width: 3em; min-width: 3em; }
#voices-delete { color: #b91c1c; border-color: #fca5a5; }
.dark #voices-delete { color: #fca5a5; border-color: #7f1d1d; }
.shoal-empty { opacity: 0.6; margin: 0.3em 0; }
"""


def theme() -> gr.themes.Base:
    # Gradio bundles its fonts (LocalFont), so the page loads nothing from outside the server.
    return gr.themes.Soft(primary_hue="teal", secondary_hue="sky", neutral_hue="slate",
                          radius_size="md", text_size="md")


# -- small helpers, free of Gradio where they can be ----------------------------------------------------------
def current_service(state: Any) -> Service:
    """The app's service, or Unavailable saying why there is none yet (the engines load in the background)."""
    if state.load_error is not None:
        raise Unavailable(f"the engines failed to load: {state.load_error}")
    if state.service is None:
        raise Unavailable("the engines are still loading; try again in a few seconds")
    return state.service


def md_escape(text: str) -> str:
    """Markdown-inert text: messages quote ids and paths, which must show as typed."""
    for ch in "\\*_[]<>#|":
        text = text.replace(ch, "\\" + ch)
    return text


def problem(exc: BaseException) -> str:
    """One line for a status element. Our errors say what to fix; anything else is logged, never shown raw."""
    if isinstance(exc, ShoalError):
        return f"⚠️ {md_escape(str(exc))}"
    log.error("web UI request failed", exc_info=exc)
    return f"⚠️ Something went wrong ({type(exc).__name__}); the server log has the details."


def seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def when(iso: str) -> str:
    """`2026-05-02T13:45:10+00:00` -> `2026-05-02 13:45 UTC`; anything unparsable as it is."""
    try:
        stamp = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    zone = stamp.tzname() or ""
    return stamp.strftime("%Y-%m-%d %H:%M") + (f" {zone}" if zone else "")


def optional_int(value: Any) -> int | None:
    """A seed as a form sends it: blank means none, otherwise a whole number."""
    if isinstance(value, str):
        value = value.strip()
    if value is None or value == "":
        return None
    try:
        number = float(value)
        if not number.is_integer():
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise BadRequest(f"seed must be a whole number, got {value!r}") from None
    return int(number)


def header_markdown(state: Any) -> str:
    """The status strip: engine, checkpoint, device, precision, queue depth, or why there is none yet."""
    title = f"# 🐟 shoal <sub>{__version__}</sub>\n"
    if state.load_error is not None:
        return (title + f"❌ **The engines failed to load:** {md_escape(state.load_error)}. The server log has the "
                "details; fix the cause and restart `shoal serve`.")
    if state.service is None:
        return title + "⏳ **Loading the engines…** This page updates by itself when they are ready."
    service: Service = state.service
    parts = []
    for name, engine in service.engines.engines.items():
        part = f"**{name}**" + (" (default)" if name == service.engines.default else "")
        if name in service.engines.checkpoints:
            part += f" from `{service.engines.checkpoints[name]}`"
        device, precision = getattr(engine, "device", None), getattr(engine, "precision", None)
        if device is not None and precision is not None:
            part += f" on {device}, {str(precision).removeprefix('torch.')}"
        parts.append(part)
    depth = service.dispatcher.depth
    queue = "idle" if depth == 0 else f"{depth} request{'s' if depth != 1 else ''} queued or running"
    return (title + "Models: " + " · ".join(parts) + f"  \nQueue: {queue} · "
            "[HTTP API docs](/docs) · [health](/v1/health)")


def notice_markdown(state: Any) -> str:
    service = state.service
    if service is None or not service.engines.notice:
        return ""
    return ("⚠️ **No Fish Speech checkpoint was found, so the bundled lite voice (piper) is speaking.** It cannot "
            "clone voices. To get the full model, run `shoal download` (it fetches openaudio-s1-mini), then restart "
            "`shoal serve`; or point `--checkpoint` at an S1 or S2-Pro checkpoint directory.  \n"
            f"<small>{md_escape(service.engines.notice)}</small>")


class UIFiles:
    """Audio files the UI hands to Gradio (downloads, history clips), in one private temp folder, pruned by age
    and count on every write so a long-running server does not fill the disk."""

    def __init__(self, max_age: float = FILE_MAX_AGE, max_count: int = FILE_MAX_COUNT):
        # Under the system temp dir, which Gradio serves from (copying each returned file into its own cache).
        self.root = Path(tempfile.mkdtemp(prefix="shoal-ui-"))
        self.max_age, self.max_count = max_age, max_count
        self._lock = threading.Lock()
        atexit.register(shutil.rmtree, self.root, ignore_errors=True)

    def write(self, audio: np.ndarray, sample_rate: int, fmt: str) -> Path:
        data = encode_audio(audio, sample_rate, fmt)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = self.root / f"shoal-{stamp}-{uuid.uuid4().hex[:6]}.{fmt}"
        with self._lock:
            path.write_bytes(data)
            self._prune()
        return path

    def _prune(self) -> None:
        files = sorted(((p.stat().st_mtime, p) for p in self.root.iterdir()), reverse=True)
        cutoff = time.time() - self.max_age
        for index, (mtime, path) in enumerate(files):
            if index >= self.max_count or mtime < cutoff:
                path.unlink(missing_ok=True)


# -- the app -----------------------------------------------------------------------------------------------
class ShoalUI:
    """The Blocks app and its handlers. `state` is the FastAPI app's state: the service appears on it once the
    engines have loaded, so every handler looks it up at event time."""

    def __init__(self, state: Any, settings):
        self.state = state
        self.settings = settings
        self.files = UIFiles()
        # Gradio streams audio to the browser as AAC made by the ffmpeg program. Without it the player gets the
        # whole clip once it is done, rather than failing every request.
        self.streaming = shutil.which("ffmpeg") is not None
        if not self.streaming:
            log.warning("ffmpeg is not on PATH: the web UI plays speech when it is complete instead of streaming "
                        "it (install ffmpeg to hear it as it is generated)")

    @property
    def service(self) -> Service:
        return current_service(self.state)

    # -- views of the service ----------------------------------------------------------------------------------
    def model_choices(self) -> list[tuple[str, str]]:
        service = self.state.service
        if service is None:
            return []
        return [(MODEL_LABELS.get(name, name), name) for name in service.model_names]

    def voice_choices(self, model: str | None) -> list[str]:
        service = self.state.service
        if service is None:
            return [DEFAULT_VOICE]
        if model not in service.model_names:
            model = service.engines.default
        return service.voice_names(model)

    def voices_table(self) -> list[list[Any]]:
        service = self.state.service
        if service is None:
            return []
        return [[v.id, round(v.duration, 1), when(v.created), short(v.text, 80)] for v in service.list_voices()]

    def saved_voice_ids(self) -> list[str]:
        service = self.state.service
        return [] if service is None else [v.id for v in service.list_voices()]

    def model_updates(self, model: str | None) -> list[dict]:
        """The controls that follow the picked model: the S2 help, then the FISH_ONLY sliders (greyed out where
        the model ignores them)."""
        service = self.state.service
        engine = (model or (service.engines.default if service else None))
        ignored = IGNORED_BY.get(engine, set())
        return [gr.update(visible=engine == "s2-pro"), *(gr.update(interactive=name not in ignored)
                                                         for name in FISH_ONLY)]

    # -- handlers: status ----------------------------------------------------------------------------------
    def refresh(self, model: str | None, voice: str | None, selected: str | None):
        """Everything that depends on the service: run at page load, by the refresh button, and by the
        timer while the engines load (which stops once they have loaded or failed)."""
        state = self.state
        loading = state.service is None and state.load_error is None
        models = self.model_choices()
        names = [value for _, value in models]
        if model not in names:
            model = state.service.engines.default if state.service is not None else None
        voices = self.voice_choices(model)
        saved = self.saved_voice_ids()
        notice = notice_markdown(state)
        return (
            header_markdown(state),
            gr.update(value=notice, visible=bool(notice)),
            gr.update(choices=models, value=model, interactive=bool(models)),
            gr.update(choices=voices, value=voice if voice in voices else DEFAULT_VOICE),
            self.voices_table(),
            gr.update(choices=saved, value=selected if selected in saved else None),
            gr.Timer(active=loading),
            *self.model_updates(model),
        )

    def model_changed(self, model: str | None, voice: str | None):
        voices = self.voice_choices(model)
        return (gr.update(choices=voices, value=voice if voice in voices else DEFAULT_VOICE),
                *self.model_updates(model))

    # -- handlers: speak -----------------------------------------------------------------------------------
    def params(self, text, model, voice, seed, temperature, top_p, repetition_penalty, max_new_tokens,
               chunk_length, speed) -> SpeechParams:
        if not text or not text.strip():
            raise BadRequest("type some text to speak first")
        return SpeechParams(text=text, model=model or None, voice=voice or None, seed=optional_int(seed),
                            temperature=float(temperature), top_p=float(top_p),
                            repetition_penalty=float(repetition_penalty), max_new_tokens=int(max_new_tokens),
                            chunk_length=int(chunk_length), speed=float(speed))

    async def generate(self, text, model, voice, seed, temperature, top_p, repetition_penalty, max_new_tokens,
                       chunk_length, speed, fmt, history, progress=gr.Progress()):
        """Stream the audio into the player chunk by chunk, as the engine yields them, then hand over the whole
        file for download and add it to the tab's history.

        Yields (player, stats, download, history)."""
        skip = gr.skip()
        start = time.perf_counter()
        try:
            service = self.service
            job = await asyncio.to_thread(
                service.prepare, self.params(text, model, voice, seed, temperature, top_p, repetition_penalty,
                                             max_new_tokens, chunk_length, speed))
        except Exception as exc:
            yield skip, problem(exc), skip, skip
            return
        rate = job.engine.sample_rate
        chunks: list[np.ndarray] = []
        first = None
        progress(None, desc="Generating…")
        try:
            async for chunk in service.stream(job):
                if first is None:
                    first = time.perf_counter() - start
                chunks.append(chunk)
                so_far = seconds(sum(len(c) for c in chunks) / rate)
                progress(None, desc=f"{so_far} of audio so far")
                # Our own wav encoder, not a (rate, array) tuple, which Gradio would peak-normalise per chunk.
                yield (encode_audio(chunk, rate, "wav") if self.streaming else skip,
                       f"⏳ Generating… {plural(len(chunks), 'chunk')}, {so_far} of audio so far", skip, skip)
            elapsed = time.perf_counter() - start
            audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
            duration = len(audio) / rate
            download = await asyncio.to_thread(self.files.write, audio, rate, fmt)
            clip = download if fmt == "wav" else await asyncio.to_thread(self.files.write, audio, rate, "wav")
        except Exception as exc:
            yield skip, problem(exc), skip, skip
            return
        rtf = elapsed / duration if duration else float("nan")
        stats = (f"✅ **{seconds(duration)}** of audio in {plural(len(chunks), 'chunk')} · first audio after "
                 f"**{seconds(first or elapsed)}** · RTF **{rtf:.2f}** ({seconds(elapsed)} to generate) · "
                 f"{job.model}"
                 + (f" · voice {md_escape(job.voice)}" if job.voice and job.voice != DEFAULT_VOICE else ""))
        label = f"{short(text, 48)} — {job.model}/{job.voice or DEFAULT_VOICE}, {seconds(duration)}"
        history = ([{"path": str(clip), "label": label}] + list(history or []))[:HISTORY_SIZE]
        yield (skip if self.streaming else str(clip)), stats, gr.update(value=str(download), visible=True), history

    async def speak(self, text, model, voice, seed, temperature, top_p, repetition_penalty, max_new_tokens,
                    chunk_length, speed, fmt) -> str:
        """The whole file at once, for `gradio_client` (api_name "speak"). Errors raise, as a client expects."""
        try:
            service = self.service
            job = await asyncio.to_thread(
                service.prepare, self.params(text, model, voice, seed, temperature, top_p, repetition_penalty,
                                             max_new_tokens, chunk_length, speed))
            audio = await service.synthesize(job)
            return str(await asyncio.to_thread(self.files.write, audio, job.engine.sample_rate, fmt or "wav"))
        except ShoalError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    # -- handlers: clone -----------------------------------------------------------------------------------
    def read_clip(self, clip: str | None) -> bytes:
        if not clip:
            raise BadRequest("upload or record a reference clip first")
        path = Path(clip)
        size = path.stat().st_size
        if size > self.settings.max_upload_bytes:
            raise BadRequest(f"the clip is {size} bytes; the limit is {self.settings.max_upload_bytes} bytes")
        return path.read_bytes()

    async def preview(self, clip, transcript, preview_text):
        """Speak `preview_text` in the uploaded voice (an inline reference: nothing is saved)."""
        try:
            service = self.service
            if service.engines.encoder() is None:
                raise BadRequest("cloning needs a fish model, and no S1 or S2-Pro checkpoint is loaded: run "
                                 "`shoal download`, then restart `shoal serve`")
            if not (transcript or "").strip():
                raise BadRequest("type what the clip says: the transcript tells the model what the voice sounds "
                                 "like saying it")
            data = await asyncio.to_thread(self.read_clip, clip)
            params = SpeechParams(text=(preview_text or "").strip() or PREVIEW_TEXT, model="fish",
                                  voice=DEFAULT_VOICE, references=[(data, transcript.strip())])
            job = await asyncio.to_thread(service.prepare, params)
            start = time.perf_counter()
            audio = await service.synthesize(job)
            path = await asyncio.to_thread(self.files.write, audio, job.engine.sample_rate, "wav")
        except Exception as exc:
            return gr.skip(), problem(exc)
        took = time.perf_counter() - start
        return str(path), (f"✅ Preview: {seconds(len(audio) / job.engine.sample_rate)} of audio in "
                           f"{seconds(took)}. Happy with it? Name it and save it.")

    def save_voice(self, clip, transcript, name, replace, model, speak_voice, selected):
        """Save the clip as a voice; returns (status, *voice views)."""
        try:
            service = self.service
            name = (name or "").strip()
            if not name:
                raise BadRequest(f"give the voice a name: {ID_RULE}")
            voice = service.add_voice(name, self.read_clip(clip), transcript or "", overwrite=bool(replace))
            message = (f"✅ Saved voice **{md_escape(voice.id)}** ({seconds(voice.duration)}). Pick it in the "
                       "Speak tab's voice list.")
        except Exception as exc:
            message = problem(exc)
        return (message, *self.voice_views(model, speak_voice, selected))

    # -- handlers: voices ----------------------------------------------------------------------------------
    def voice_views(self, model, speak_voice, selected):
        """(Speak's voice picker, the voices table, the Voices tab's picker) after the library changed."""
        voices = self.voice_choices(model)
        saved = self.saved_voice_ids()
        return (gr.update(choices=voices, value=speak_voice if speak_voice in voices else DEFAULT_VOICE),
                self.voices_table(),
                gr.update(choices=saved, value=selected if selected in saved else None))

    def play_voice(self, voice_id):
        """(clip for the player, transcript) of a saved voice: its first clip, for a voice of several."""
        if not voice_id:
            return None, ""
        try:
            service = self.service
            voice = service.voices.get(voice_id)
            # int16 as stored: Gradio leaves integer PCM alone (it peak-normalises floats).
            audio, rate = sf.read(service.voices.clip_path(voice_id), dtype="int16")
            clips = f" (clip 1 of {len(voice.clips)})" if len(voice.clips) > 1 else ""
            return (rate, audio), f"**Transcript{clips}:** {md_escape(voice.clips[0].text)}"
        except Exception as exc:
            return None, problem(exc)

    def pick_row(self, evt: gr.SelectData, table):
        """A click in the table picks that row's voice."""
        try:
            row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            values = table.values.tolist() if hasattr(table, "values") else table
            return gr.update(value=values[row][0])
        except Exception:
            return gr.skip()

    def rename_voice(self, selected, new_name, model, speak_voice):
        try:
            if not selected:
                raise BadRequest("pick a voice to rename first")
            new_name = (new_name or "").strip()
            if not new_name:
                raise BadRequest(f"type the new name: {ID_RULE}")
            voice = self.service.rename_voice(selected, new_name)
            message = f"✅ Renamed **{md_escape(selected)}** to **{md_escape(voice.id)}**."
            if speak_voice == selected:  # the Speak tab follows the voice it had picked
                speak_voice = voice.id
            selected = voice.id
        except Exception as exc:
            message = problem(exc)
        return (message, *self.voice_views(model, speak_voice, selected), "")

    def delete_voice(self, selected, sure, model, speak_voice):
        try:
            if not selected:
                raise BadRequest("pick a voice to delete first")
            if not sure:
                raise BadRequest(f"tick “I'm sure” to delete {selected!r}: deleting cannot be undone")
            self.service.delete_voice(selected)
            message, selected = f"🗑️ Deleted **{md_escape(selected)}**.", None
        except Exception as exc:
            message = problem(exc)
        return (message, *self.voice_views(model, speak_voice, selected), False)

    # -- layout ----------------------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        limit = self.settings.max_text_length
        with gr.Blocks(title="shoal", analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
            with gr.Row():
                header = gr.Markdown(header_markdown(self.state), elem_id="shoal-header")
                refresh = gr.Button("↻", elem_id="shoal-refresh", scale=0, min_width=48, size="sm")
            notice = gr.Markdown(visible=False, elem_classes="shoal-notice", elem_id="shoal-notice")
            timer = gr.Timer(LOADING_POLL_SECONDS, active=True)

            with gr.Tabs():
                # ---------------------------------------------------------------- Speak
                with gr.Tab("Speak", id="speak", elem_id="tab-speak"):
                    with gr.Row():
                        with gr.Column(scale=3):
                            text = gr.Textbox(label="Text", lines=7, max_lines=20, elem_id="speak-text",
                                              placeholder="Type or paste what shoal should say…")
                            count = gr.Markdown(f"0 / {limit} characters", elem_id="shoal-count")
                            s2_help = gr.Markdown(S2_HELP, visible=False, elem_id="shoal-s2-help",
                                                  elem_classes="shoal-status")
                            gr.Examples(EXAMPLES, inputs=text, label="Try one")
                            with gr.Row():
                                model = gr.Dropdown(label="Model", choices=[], elem_id="speak-model",
                                                    interactive=False)
                                voice = gr.Dropdown(label="Voice", choices=[DEFAULT_VOICE], value=DEFAULT_VOICE,
                                                    elem_id="speak-voice",
                                                    info="“default” is the model's own voice")
                            with gr.Accordion("Advanced settings", open=False):
                                with gr.Row():
                                    seed = gr.Number(label="Seed", value=None, precision=0,
                                                     info="blank: a fresh random seed each time")
                                    fmt = gr.Dropdown(label="Download format", choices=list(FORMATS),
                                                      value="wav", elem_id="speak-format")
                                with gr.Row():
                                    temperature = slider(TEMPERATURE, "Temperature")
                                    top_p = slider(TOP_P, "Top-p")
                                with gr.Row():
                                    repetition_penalty = slider(REPETITION_PENALTY, "Repetition penalty",
                                                                elem_id="speak-repetition-penalty")
                                    speed = slider(SPEED, "Speed")
                                with gr.Row():
                                    max_new_tokens = slider(MAX_NEW_TOKENS, "Max new tokens",
                                                            info="0: as many as fit; ~21.5 per second")
                                    chunk_length = slider(CHUNK_LENGTH, "Chunk length",
                                                          info="characters per segment; 0: never split")
                                gr.Markdown("Top-p, repetition penalty, max new tokens and chunk length only "
                                            "apply to the fish models (S2-Pro ignores the repetition penalty).",
                                            elem_classes="shoal-status")
                            with gr.Row():
                                generate = gr.Button("Generate", variant="primary", elem_id="speak-generate",
                                                     scale=3)
                                stop = gr.Button("Stop", variant="stop", elem_id="speak-stop", scale=1)
                        with gr.Column(scale=2):
                            player = gr.Audio(label="Speech", streaming=self.streaming, autoplay=True,
                                              interactive=False, elem_id="speak-audio", buttons=["download"])
                            stats = gr.Markdown("Press **Generate**: audio plays as it is produced.",
                                                elem_id="shoal-stats")
                            download = gr.File(label="Download", interactive=False, elem_id="speak-download",
                                               visible=False)
                            history = gr.State([])
                            with gr.Accordion(f"History (last {HISTORY_SIZE} in this tab)", open=True):
                                @gr.render(inputs=history)
                                def show_history(items):
                                    if not items:
                                        # (A Markdown here trips a Gradio 6 front-end error when it unmounts.)
                                        gr.HTML("<p class='shoal-empty'>Nothing yet.</p>", apply_default_css=False)
                                        return
                                    for item in items:
                                        if Path(item["path"]).exists():
                                            gr.Audio(item["path"], label=item["label"], interactive=False,
                                                     elem_classes="shoal-history", buttons=["download"])

                # ---------------------------------------------------------------- Clone
                with gr.Tab("Clone", id="clone", elem_id="tab-clone"):
                    gr.Markdown(f"Give shoal {self.settings.min_voice_seconds:g} to "
                                f"{self.settings.max_voice_seconds:g} seconds of one person speaking clearly, and "
                                "type exactly what they say. Preview the result, then save it as a voice to use "
                                "from the Speak tab and the API.")
                    with gr.Row():
                        with gr.Column():
                            clip = gr.Audio(label="Reference clip", sources=["upload", "microphone"],
                                            type="filepath", elem_id="clone-clip", buttons=[])
                            transcript = gr.Textbox(label="Transcript of the clip", lines=3,
                                                    elem_id="clone-transcript",
                                                    placeholder="Exactly what is said in the clip")
                            preview_text = gr.Textbox(label="Preview text", value=PREVIEW_TEXT, lines=2,
                                                      elem_id="clone-preview-text")
                            preview_button = gr.Button("Preview", elem_id="clone-preview")
                        with gr.Column():
                            preview_audio = gr.Audio(label="Preview", interactive=False, autoplay=True,
                                                     elem_id="clone-preview-audio", buttons=["download"])
                            name = gr.Textbox(label="Voice name", elem_id="clone-name",
                                              placeholder="e.g. narrator-anna", info=ID_RULE)
                            replace = gr.Checkbox(label="Replace a saved voice of the same name", value=False)
                            save = gr.Button("Save as voice", variant="primary", elem_id="clone-save")
                            clone_status = gr.Markdown("", elem_id="clone-status", elem_classes="shoal-status")

                # ---------------------------------------------------------------- Voices
                with gr.Tab("Voices", id="voices", elem_id="tab-voices"):
                    table = gr.Dataframe(headers=["Voice", "Seconds", "Created", "Transcript"],
                                         datatype=["str", "number", "str", "str"], value=[],
                                         interactive=False, label="Saved voices (click a row to pick one)",
                                         elem_id="voices-table",
                                         wrap=True)
                    with gr.Row():
                        with gr.Column():
                            selected = gr.Dropdown(label="Voice", choices=[], value=None, elem_id="voices-pick")
                            clip_player = gr.Audio(label="Clip", interactive=False, elem_id="voices-clip",
                                                   buttons=["download"])
                            clip_text = gr.Markdown("", elem_classes="shoal-status", elem_id="voices-transcript")
                        with gr.Column():
                            with gr.Row(equal_height=True):
                                new_name = gr.Textbox(label="New name", elem_id="voices-new-name", scale=3)
                                rename = gr.Button("Rename", elem_id="voices-rename", scale=1)
                            with gr.Row(equal_height=True):
                                sure = gr.Checkbox(label="I'm sure", value=False, elem_id="voices-sure", scale=3)
                                delete = gr.Button("Delete", variant="stop", elem_id="voices-delete", scale=1)
                            voices_status = gr.Markdown("", elem_id="voices-status", elem_classes="shoal-status")

            follow_model = [s2_help, top_p, repetition_penalty, max_new_tokens, chunk_length]
            private = {"api_visibility": "private"}

            # The character count never needs the server.
            text.change(None, inputs=text, outputs=count, js=f"(t) => `${{(t || '').length}} / {limit} characters`"
                        f" + ((t || '').length > {limit} ? ' — over the limit' : '')", **private)

            refresh_io = dict(fn=self.refresh, inputs=[model, voice, selected],
                              outputs=[header, notice, model, voice, table, selected, timer, *follow_model],
                              show_progress="hidden", **private)
            demo.load(**refresh_io)
            refresh.click(**refresh_io)
            timer.tick(**refresh_io)
            model.change(self.model_changed, inputs=[model, voice], outputs=[voice, *follow_model],
                         show_progress="hidden", **private)

            speak_inputs = [text, model, voice, seed, temperature, top_p, repetition_penalty, max_new_tokens,
                            chunk_length, speed, fmt]
            run = generate.click(self.generate, inputs=[*speak_inputs, history],
                                 outputs=[player, stats, download, history], show_progress="minimal",
                                 show_progress_on=[stats], **private)
            stop.click(None, cancels=[run], **private)
            # For scripts (gradio_client): the same request, the whole file at once. Its own hidden inputs, so a
            # client is not held to the choices this page's dropdowns had when it was built (none yet).
            with gr.Group(visible=False):
                api_inputs = [
                    gr.Textbox(label="text"), gr.Textbox(label="model", value=""),
                    gr.Textbox(label="voice", value=DEFAULT_VOICE), gr.Textbox(label="seed", value=""),
                    *(gr.Number(label=p.name, value=p.default, precision=0 if p.integer else None)
                      for p in (TEMPERATURE, TOP_P, REPETITION_PENALTY, MAX_NEW_TOKENS, CHUNK_LENGTH, SPEED)),
                    gr.Textbox(label="format", value="wav")]
                api_output = gr.File(label="audio")
                api_button = gr.Button()
            api_button.click(self.speak, inputs=api_inputs, outputs=api_output, api_name="speak")

            voice_outputs = [voice, table, selected]
            preview_button.click(self.preview, inputs=[clip, transcript, preview_text],
                                 outputs=[preview_audio, clone_status], **private)
            save.click(self.save_voice, inputs=[clip, transcript, name, replace, model, voice, selected],
                       outputs=[clone_status, *voice_outputs], **private)

            selected.change(self.play_voice, inputs=selected, outputs=[clip_player, clip_text],
                            show_progress="hidden", **private)
            table.select(self.pick_row, inputs=table, outputs=selected, show_progress="hidden", **private)
            rename.click(self.rename_voice, inputs=[selected, new_name, model, voice],
                         outputs=[voices_status, *voice_outputs, new_name], **private)
            delete.click(self.delete_voice, inputs=[selected, sure, model, voice],
                         outputs=[voices_status, *voice_outputs, sure], **private)
        # Gradio's own queue holds what the service's queue would refuse, showing each tab its place in line.
        demo.queue(default_concurrency_limit=self.settings.queue_size)
        return demo


def check_key(key: str):
    """Gradio's login check: any username, the API key as the password (compared in constant time)."""
    expected = key.encode()

    def auth(username: str, password: str) -> bool:
        return hmac.compare_digest((password or "").encode(), expected)

    return auth


class UIMount(Mount):
    """The UI's mount at `/`, which leaves the API's paths alone. Starlette takes a full match (a mount at `/`
    matches everything) over a partial one (a route whose path matches but whose method does not), so without
    this a GET on a POST-only route would get the UI's 404 instead of the API's 405."""

    def matches(self, scope):
        path = scope.get("path", "")
        if any(path == prefix or path.startswith(prefix + "/") for prefix in API_PATHS):
            return Match.NONE, {}
        return super().matches(scope)


def mount_ui(app: FastAPI, settings) -> FastAPI:
    """Mount the UI at `/` on `app`, after its API routes, which keep their paths (see UIMount)."""
    ui = ShoalUI(app.state, settings)
    key = settings.api_key.get_secret_value() if settings.api_key else None
    app = gr.mount_gradio_app(
        app, ui.build(), path="/", auth=check_key(key) if key else None,
        auth_message="This shoal server needs its API key: any username, and the key as the password.",
        footer_links=[], ssr_mode=False, mcp_server=False, show_error=False, theme=theme(), css=CSS,
        max_file_size=settings.max_upload_bytes)
    mount = app.router.routes[-1]
    if not isinstance(mount, Mount):
        raise RuntimeError(f"expected Gradio's mount as the last route, found {mount!r}")
    app.router.routes[-1] = UIMount(mount.path, app=mount.app, name=mount.name)
    return app
