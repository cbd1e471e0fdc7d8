"""The web UI as a person and a script use it: a real `shoal serve` with a tiny checkpoint, headless Chromium
(Debian's, driven by Playwright), and `gradio_client`."""

from __future__ import annotations

import io
import re
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import soundfile as sf

from shoal.engines.registry import load_engines
from shoal.errors import CheckpointError
from shoal.server.app import create_app
from shoal.settings import Settings
from shoal.testing import free_port

pytestmark = [
    pytest.mark.browser,
    # Gradio's queue calls pandas 3 in ways it deprecates; the in-process servers below surface it here.
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


PENALTY = "#speak-repetition-penalty input[type=range]"


def open_ui(page, url: str) -> None:
    page.goto(url + "/")
    # The header leaves "loading" once the page's first refresh has seen the service.
    page.wait_for_selector("#shoal-header:has-text('Models:')")


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def wait_text(page, selector: str, pattern: str, timeout: float = 60_000, changed_from: str | None = None) -> str:
    """Wait until `selector`'s text matches `pattern` (a regex), and differs from `changed_from` if given, and
    return the text."""
    page.wait_for_function(
        """([sel, pat, old]) => { const host = document.querySelector(sel);
                                  // a Markdown's own text, without the progress overlay Gradio lays over it
                                  const el = host && (host.querySelector('[data-testid=markdown]') || host);
                                  return el && new RegExp(pat).test(el.innerText) && el.innerText !== old }""",
        arg=[selector, pattern, changed_from], timeout=timeout)
    return text(page, selector)


def text(page, selector: str) -> str:
    return page.evaluate("""(sel) => { const host = document.querySelector(sel);
                                       return (host.querySelector('[data-testid=markdown]') || host).innerText }""",
                         selector)


def shot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)


def test_speak_streams_into_the_player(ui_server, page, tmp_path):
    open_ui(page, ui_server.url)
    header = text(page, "#shoal-header")
    assert "s1" in header and "cpu" in header and "float32" in header and "Queue" in header
    page.fill("#speak-text textarea", "Hello there. This is the web UI speaking, in a streamed voice.")
    wait_text(page, "#shoal-count", r"^6\d / 5000 characters")
    page.click("#speak-generate")
    stats = wait_text(page, "#shoal-stats", r"✅|⚠")
    assert "✅" in stats, stats
    assert re.search(r"of audio in \d+ chunks? · first audio after [\d.]+ s · RTF [\d.]+", stats), stats
    # The streamed player ends up with a playable source of the whole clip.
    page.wait_for_function("""() => { const a = document.querySelector('#speak-audio audio');
                                      return a && a.currentSrc && a.duration > 0 && isFinite(a.duration) }""")
    # The download is the complete file in the chosen format (wav by default).
    href = page.get_attribute("#speak-download a[href]", "href")
    assert href and href.endswith(".wav")
    audio, rate = sf.read(io.BytesIO(httpx.get(href if href.startswith("http") else ui_server.url + href).content))
    assert rate > 0 and len(audio) > 0
    # This tab's history holds the result, playable.
    page.wait_for_selector(".shoal-history audio, .shoal-history [data-testid='waveform-Audio']", state="attached")
    shot(page, tmp_path / "speak.png")


def test_clone_save_list_and_delete_a_voice(ui_server, page, fixture_dir, tmp_path):
    open_ui(page, ui_server.url)
    tab(page, "Clone")
    page.set_input_files("#clone-clip input[type=file]", str(fixture_dir / "reference.wav"))
    page.wait_for_selector("#clone-clip audio, #clone-clip [data-testid='waveform-Audio']", state="attached")

    # A validation error shows inline, in words, never as a traceback.
    page.fill("#clone-name textarea", "ui-voice")
    page.click("#clone-save")
    status = wait_text(page, "#clone-status", "transcript")
    assert "must not be empty" in status and "Traceback" not in status

    page.fill("#clone-transcript textarea", (fixture_dir / "reference.txt").read_text().strip())
    page.click("#clone-preview")
    status = wait_text(page, "#clone-status", r"Preview:|⚠", changed_from=status)
    assert "Preview:" in status, status
    page.click("#clone-save")
    status = wait_text(page, "#clone-status", r"Saved voice|⚠", changed_from=status)
    assert "Saved voice ui-voice" in status, status
    shot(page, tmp_path / "clone.png")
    assert "ui-voice" in [v for v in httpx.get(ui_server.url + "/v1/references/list").json()["reference_ids"]]

    tab(page, "Voices")
    wait_text(page, "#voices-table", "ui-voice")
    page.locator("#voices-table [role=gridcell]", has_text="ui-voice").first.click()
    page.wait_for_function("() => document.querySelector('#voices-pick input')?.value === 'ui-voice'")
    page.wait_for_selector("#voices-clip audio, #voices-clip [data-testid='waveform-Audio']", state="attached")
    assert "short reference recording" in text(page, "#voices-transcript")
    shot(page, tmp_path / "voices.png")

    page.fill("#voices-new-name textarea", "bad name!")
    page.click("#voices-rename")
    assert "invalid voice id" in wait_text(page, "#voices-status", "⚠")
    page.fill("#voices-new-name textarea", "ui-voice-2")
    page.click("#voices-rename")
    wait_text(page, "#voices-status", "Renamed")
    wait_text(page, "#voices-table", "ui-voice-2")
    page.wait_for_function("() => document.querySelector('#voices-pick input')?.value === 'ui-voice-2'")

    page.click("#voices-delete")  # without "I'm sure": refused, with the reason
    assert "I'm sure" in wait_text(page, "#voices-status", "sure")
    assert "ui-voice-2" in page.inner_text("#voices-table")
    page.check("#voices-sure input")
    page.click("#voices-delete")
    wait_text(page, "#voices-status", "Deleted")
    page.wait_for_function("() => !document.querySelector('#voices-table').innerText.includes('ui-voice')")
    assert httpx.get(ui_server.url + "/v1/references/list").json()["reference_ids"] == []


def test_gradio_client_speak(ui_server, tmp_path):
    from gradio_client import Client

    client = Client(ui_server.url + "/", verbose=False, download_files=str(tmp_path))
    path = client.predict("Hello from a script.", api_name="/speak")
    audio, rate = sf.read(path)
    assert rate > 0 and len(audio) > 0
    path = client.predict("Now in the lite voice.", "piper", "default", 0, 0.8, 0.8, 1.1, 1024, 200, 1.0, "mp3",
                          api_name="/speak")
    assert Path(path).read_bytes()[:3] in (b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="unknown voice"):
        client.predict("Hi.", "fish", "nobody", api_name="/speak")


def test_api_key_needs_a_login_and_the_api_still_works(make_ui_server, page, tmp_path):
    srv = make_ui_server("--api-key", "s3cret")
    page.goto(srv.url + "/")
    page.wait_for_selector("input[type=password]")
    page.fill("input[type=text]", "anyone")
    page.fill("input[type=password]", "wrong")
    page.get_by_role("button", name=re.compile("login", re.I)).click()
    page.wait_for_selector("text=/incorrect/i")
    page.fill("input[type=text]", "someone-else")  # the form clears after a failed login
    page.fill("input[type=password]", "s3cret")
    page.get_by_role("button", name=re.compile("login", re.I)).click()
    page.wait_for_selector("#shoal-header:has-text('Models:')")
    # The API keeps its own bearer check, unaffected by the UI's login.
    assert httpx.get(srv.url + "/v1/references/list").status_code == 401
    assert httpx.get(srv.url + "/v1/references/list", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_lite_voice_notice(make_ui_server, page, tmp_path):
    """No checkpoint (the server's cwd and data dir are fresh): the notice says the lite voice serves, and how
    to fix it."""
    srv = make_ui_server(checkpoint=None)
    assert httpx.get(srv.url + "/v1/health").json()["notice"]
    open_ui(page, srv.url)
    notice = wait_text(page, "#shoal-notice", "shoal download")
    assert "lite voice" in notice
    # piper streams one chunk per sentence.
    page.fill("#speak-text textarea", "The lite voice still speaks. It has no checkpoint. It needs none.")
    page.click("#speak-generate")
    stats = wait_text(page, "#shoal-stats", r"✅|⚠")
    assert "in 3 chunks" in stats and "piper" in stats, stats
    shot(page, tmp_path / "lite.png")


def test_s2_pro_shows_its_syntax_and_greys_out_what_it_ignores(make_ui_server, page, tmp_path, s2_fixture_dir):
    """With S2-Pro served beside S1, picking it shows the speaker and tag help and greys out the repetition
    penalty (S2 samples without one); picking S1 again hides the help. S2 then speaks a two-speaker text."""
    srv = make_ui_server("--extra-checkpoint", str(s2_fixture_dir))
    open_ui(page, srv.url)
    assert not page.is_visible("#shoal-s2-help")

    def pick(label: str) -> None:
        page.click("#speak-model input")
        page.get_by_role("option", name=re.compile(f"^{re.escape(label)}")).click()

    page.get_by_text("Advanced settings").click()
    page.wait_for_selector(PENALTY, state="attached")
    pick("s2-pro")
    page.wait_for_selector("#shoal-s2-help", state="visible")
    assert "<|speaker:0|>" in text(page, "#shoal-s2-help") and "[whisper]" in text(page, "#shoal-s2-help")
    page.wait_for_function(f"() => document.querySelector('{PENALTY}').disabled")
    page.fill("#speak-text textarea", "<|speaker:0|>Hello there. <|speaker:1|>[laughing] Hi!")
    page.click("#speak-generate")
    stats = wait_text(page, "#shoal-stats", r"✅|⚠")
    assert "✅" in stats and "s2-pro" in stats, stats
    shot(page, tmp_path / "s2.png")
    pick("s1")
    page.wait_for_selector("#shoal-s2-help", state="hidden")
    page.wait_for_function(f"() => !document.querySelector('{PENALTY}').disabled")


def test_without_ffmpeg_the_player_gets_the_whole_clip(make_ui_server, page, tmp_path):
    """Gradio streams through the ffmpeg program; where there is none, the UI still speaks, just not streamed."""
    srv = make_ui_server(env={"PATH": str(Path(sys.executable).parent)})
    open_ui(page, srv.url)
    page.fill("#speak-text textarea", "No ffmpeg here. Still speaking.")
    page.click("#speak-generate")
    stats = wait_text(page, "#shoal-stats", r"✅|⚠")
    assert "✅" in stats, stats
    # A finished clip, in the waveform player rather than the streaming <audio> element. The tiny model's clips
    # can be shorter than a second, so the player's "0:00" duration says nothing: wait for the drawn waveform,
    # then check the player's file is the whole clip the stats describe.
    page.wait_for_function("""() => { const w = document.querySelector('#speak-audio #waveform > div');
                                      return w && w.shadowRoot && w.shadowRoot.querySelector('canvas') }""")
    href = page.get_attribute("#speak-audio a[data-testid=download-link]", "href")
    assert href and href.endswith(".wav"), href
    audio, rate = sf.read(io.BytesIO(httpx.get(href if href.startswith("http") else srv.url + href).content))
    # The stats round the duration (two decimals under 10 s, one above): allow half of the last digit shown.
    shown = re.search(r"(\d+)\.(\d+) s of audio", stats)
    seconds, within = float(f"{shown.group(1)}.{shown.group(2)}"), 0.5 * 10 ** -len(shown.group(2)) + 1e-9
    assert abs(len(audio) / rate - seconds) <= within, (len(audio) / rate, stats)
    shot(page, tmp_path / "no-ffmpeg.png")
    assert "ffmpeg is not on PATH" in srv.log.read_text()


# -- the states before the service exists: an in-process server whose engine loader waits on a gate (or raises),
# so each state holds as long as the test needs -----------------------------------------------------------------
class InProcessServer:
    def __init__(self, app, port: int):
        import uvicorn

        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                   timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, name="ui-test-server", daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def settings_for(tmp_path, checkpoint) -> Settings:
    return Settings.load(cli={"checkpoint": str(checkpoint), "data_dir": str(tmp_path / "data"),
                              "log_level": "warning"}, env={}, dotenv=None)


def test_loading_then_ready(page, tmp_path, tiny_checkpoint):
    gate = threading.Event()

    def slow_loader(settings):
        if not gate.wait(120):
            raise RuntimeError("the test never opened the gate")
        return load_engines(settings)

    port = free_port()
    with InProcessServer(create_app(settings_for(tmp_path, tiny_checkpoint), slow_loader), port) as srv:
        page.goto(srv.url + "/")
        wait_text(page, "#shoal-header", "Loading the engines")
        # Asking for speech now is answered in words, not with an error page.
        page.fill("#speak-text textarea", "Too early.")
        page.click("#speak-generate")
        assert "still loading" in wait_text(page, "#shoal-stats", "⚠")
        gate.set()
        # The page polls while loading, and fills itself in once the service is there.
        wait_text(page, "#shoal-header", "Models:", timeout=90_000)
        page.wait_for_function("() => document.querySelector('#speak-model input')?.value.startsWith('s1')")
        assert "Queue: idle" in text(page, "#shoal-header")


def test_failed_load_is_shown(page, tmp_path, tiny_checkpoint):
    def broken_loader(settings):
        raise CheckpointError("model.pth does not match the architecture")

    port = free_port()
    with InProcessServer(create_app(settings_for(tmp_path, tiny_checkpoint), broken_loader), port) as srv:
        page.goto(srv.url + "/")
        header = wait_text(page, "#shoal-header", "failed to load")
        assert "model.pth does not match the architecture" in header
        page.fill("#speak-text textarea", "Anyone there?")
        page.click("#speak-generate")
        assert "failed to load" in wait_text(page, "#shoal-stats", "⚠")
