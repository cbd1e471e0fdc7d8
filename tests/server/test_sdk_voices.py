"""The official Fish Audio SDKs' voice management against a real shoal server: `fishaudio`'s `client.voices`
(sync and async) and the legacy `fish_audio_sdk.Session` model calls, with only `base_url` changed."""

from __future__ import annotations

import asyncio
import uuid

import fishaudio
import pytest
from fishaudio.exceptions import APIError, NotFoundError

from support import noise_clip

PNG = b"\x89PNG\r\n\x1a\n" + bytes(64)
#: shoal's server in these tests has no API key, but the SDK insists on sending one.
ANY_KEY = "unused"


def test_sync_client_lists_creates_gets_updates_and_deletes(server):
    tag = f"sdk-{uuid.uuid4().hex[:8]}"
    client = fishaudio.FishAudio(api_key=ANY_KEY, base_url=server.url)
    try:
        voice = client.voices.create(title="SDK voice", voices=[noise_clip(1.5, 41), noise_clip(1.5, 42)],
                                     texts=["First clip.", "Second clip."], tags=[tag, "sdk"],
                                     description="made by the SDK", cover_image=PNG)
        assert voice.title == "SDK voice" and voice.tags == [tag, "sdk"] and voice.state == "trained"
        assert [s.text for s in voice.samples] == ["First clip.", "Second clip."]
        assert voice.cover_image == f"/model/{voice.id}/cover"

        page = client.voices.list(tags=tag, page_size=5)
        assert page.total == 1 and [v.id for v in page.items] == [voice.id]
        assert client.voices.list(tags=[tag, "sdk"], self_only=True, sort_by="created_at").total == 1

        assert client.voices.update(voice.id, title="Renamed", tags=["changed"], visibility="public") is None
        changed = client.voices.get(voice.id)
        assert (changed.title, changed.tags, changed.visibility) == ("Renamed", ["changed"], "public")
        client.voices.update(voice.id, cover_image=PNG[:8] + b"\x01" * 64)  # multipart this time
        assert client.voices.get(voice.id).cover_image == voice.cover_image

        config = fishaudio.types.TTSConfig(max_new_tokens=6)  # a few frames of the tiny model
        audio = client.tts.convert(text="Hello.", reference_id=voice.id, format="wav", config=config)
        assert audio[:4] == b"RIFF"

        assert client.voices.delete(voice.id) is None
        with pytest.raises(NotFoundError, match=voice.id):  # the SDK shows shoal's message
            client.voices.get(voice.id)
        with pytest.raises(APIError, match="does not transcribe") as refused:
            client.voices.create(title="No texts", voices=[noise_clip(1.5, 43)])
        assert refused.value.status == 400
    finally:
        client.close()


def test_async_client_lists_creates_gets_updates_and_deletes(server):
    tag = f"sdk-async-{uuid.uuid4().hex[:8]}"

    async def main():
        client = fishaudio.AsyncFishAudio(api_key=ANY_KEY, base_url=server.url)
        try:
            voice = await client.voices.create(title="Async voice", voices=[noise_clip(1.5, 51)],
                                               texts=["One clip."], tags=[tag])
            assert (await client.voices.list(tags=tag)).items[0].id == voice.id
            await client.voices.update(voice.id, description="changed")
            assert (await client.voices.get(voice.id)).description == "changed"
            await client.voices.delete(voice.id)
            assert (await client.voices.list(tags=tag)).total == 0
            with pytest.raises(NotFoundError):
                await client.voices.delete(voice.id)
        finally:
            await client.close()

    asyncio.run(main())


def test_legacy_session_model_calls(server):
    from fish_audio_sdk import Session
    from fish_audio_sdk.exceptions import HttpCodeErr

    tag = f"legacy-{uuid.uuid4().hex[:8]}"
    with Session(ANY_KEY, base_url=server.url) as session:
        model = session.create_model(title="Legacy", voices=[noise_clip(1.5, 61)], texts=["Old SDK."], tags=[tag])
        assert session.get_model(model.id).title == "Legacy"
        assert [m.id for m in session.list_models(tag=tag).items] == [model.id]
        session.update_model(model.id, title="Legacy, renamed")
        assert session.get_model(model.id).title == "Legacy, renamed"
        session.delete_model(model.id)
        with pytest.raises(HttpCodeErr) as missing:
            session.get_model(model.id)
        assert missing.value.status == 404 and model.id in missing.value.message
