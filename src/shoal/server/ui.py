"""The web UI (placeholder until the Gradio app lands): a pointer to the API docs."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import HTMLResponse


def mount_ui(app: FastAPI, settings) -> FastAPI:
    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse("<!doctype html><title>shoal</title><p>shoal is running. "
                            "<a href='/docs'>API documentation</a></p>")

    return app
