"""One settings object for the whole process.

Values come from, in this order of precedence: command-line flags, `SHOAL_*` environment variables, a `.env`
file in the working directory, then the defaults below. `Settings.load()` is the only place that reads the
environment; everything else receives the built object.
"""

from __future__ import annotations

import difflib
import json
import os
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import platformdirs
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from dotenv import dotenv_values

from shoal.errors import BadRequest
from shoal.layout import GENERATION_HEADROOM

ENV_PREFIX = "SHOAL_"
#: The Fish Audio cloud's model names that clients send by default (the SDK `s2-pro`, LiveKit `s2.1-pro`) and
#: the model closest to each. A served model answers to its own name first; a target that is not served is looked
#: up in the map again (`s2.1-pro` -> `s2-pro` -> `s1` when only S1 is served), and the default model ends the
#: chain.
FISH_MODEL_MAP = {"s2-pro": "s1", "s2.1-pro": "s2-pro", "speech-1.5": "s1", "speech-1.6": "s1", "drama-3": "s2-pro"}
DOTENV = ".env"


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("shoal", appauthor=False))


class Settings(BaseSettings):
    """Everything an operator can set. See the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=DOTENV, env_file_encoding="utf-8",
                                      extra="ignore", validate_default=True)

    # The model
    checkpoint: Path | None = Field(None, description="checkpoint directory, S1 or S2-Pro (default: search the usual "
                                    "places)")
    extra_checkpoints: Annotated[list[Path], NoDecode] = Field(default_factory=list, description="more checkpoints "
                                                              "served side by side, each under its model name "
                                                              "(e.g. an S2-Pro beside an S1), comma-separated")
    device: str = Field("auto", description="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    precision: str = Field("auto", description="auto (bf16 on cuda, else float32), float32, bfloat16, float16")
    compile: bool = Field(False, description="torch.compile the decode step (bucketed shapes, static KV caches; "
                          "kernels cached under the data dir)")
    cuda_graphs: bool = Field(False, description="also capture the compiled decode step as CUDA graphs (CUDA "
                              "with compile only)")
    compile_cache: Path | None = Field(None, description="where compiled kernels are kept across restarts "
                                       "(default: <data dir>/compile-cache)")
    quantize: Literal["none", "int8"] = Field("none", description="int8: the slow and fast transformers' linear "
                                              "layers run with int8 weights per output channel (CPU only, float32; "
                                              "the embeddings and the codec stay float32; output is close to, not "
                                              "identical with, float32's)")
    max_seq_len: int | None = Field(None, gt=GENERATION_HEADROOM, description="positions per request (prompt + "
                                    "generated), capping the checkpoint's own (8192 for S1-mini): smaller KV caches, "
                                    "shorter prompts and utterances (default: the checkpoint's)")
    # The server
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8080, ge=0, le=65535, description="port to listen on")
    api_key: SecretStr | None = Field(None, description="require `Authorization: Bearer KEY` on the API")
    data_dir: Path = Field(default_factory=default_data_dir, description="saved voices and caches")
    ui: bool = Field(True, description="serve the web UI at /")
    public_discovery: bool = Field(False, description="let `GET /v1/audio/voices` and `GET /v1/audio/models` "
                                   "answer without the API key (Open WebUI lists voices without sending it); "
                                   "speech and voice changes still need it")
    wyoming_port: int | None = Field(None, ge=1, le=65535, description="also serve the Wyoming protocol (Home "
                                     "Assistant) on this TCP port, on the same host, engines and voices "
                                     "(default: off)")
    wyoming_zeroconf: bool = Field(False, description="with wyoming_port, advertise the Wyoming server over "
                                   "mDNS (`_wyoming._tcp`) so Home Assistant discovers it; needs the "
                                   "`zeroconf` package")
    # Limits
    queue_size: int = Field(16, ge=1, description="requests waiting or running before 429")
    request_timeout: float = Field(600.0, gt=0, description="seconds one request may take")
    max_text_length: int = Field(5000, ge=1, description="characters per request")
    max_body_bytes: int = Field(32 * 2**20, ge=1024, description="bytes per request body")
    max_upload_bytes: int = Field(20 * 2**20, ge=1024, description="bytes per voice clip")
    min_voice_seconds: float = Field(1.0, ge=0, description="shortest voice clip")
    max_voice_seconds: float = Field(60.0, gt=0, description="longest voice clip")
    max_voice_clips: int = Field(8, ge=1, description="clips per saved voice (each one's codes go into every "
                                 "prompt that uses the voice)")
    max_cover_bytes: int = Field(2 * 2**20, ge=1024, description="bytes per voice cover image")
    min_free_disk_mb: float = Field(500.0, ge=0, description="/v1/health and shoal doctor warn when the data "
                                    "dir's file system has less free space than this, in MiB")
    reference_cache_size: int = Field(16, ge=0, description="encoded inline references kept in memory")
    rate_limit: float = Field(0.0, ge=0, description="API requests per minute per key (per client address "
                              "without an API key); 0 turns the limit off")
    rate_limit_burst: int = Field(10, ge=1, description="requests a key may make at once before the rate "
                                  "limit applies")
    shutdown_grace: float = Field(30.0, ge=0, description="seconds in-flight requests may take to finish on "
                                  "SIGTERM before the server exits anyway")
    # The live WebSocket (/v1/tts/live)
    live_idle_timeout: float = Field(330.0, gt=0, description="seconds a live WebSocket may stay silent while "
                                     "nothing is being generated before it is closed (above LiveKit's 300 s "
                                     "socket reuse, so a pooled socket is retired by the client first)")
    live_max_buffered_chars: int = Field(2000, ge=1, description="characters of live text waiting for a "
                                         "sentence end (not yet segmented)")
    live_max_text_chars: int = Field(100_000, ge=1, description="characters of text per live WebSocket, over "
                                     "all its utterances")
    live_max_message_bytes: int = Field(16 * 2**20, ge=1024, description="bytes per live WebSocket message "
                                        "(a start event carries its reference clips)")
    live_audio_queue: int = Field(32, ge=2, description="encoded audio messages a live WebSocket holds for a "
                                  "slow reader before its next segment waits")
    # Batching and streaming
    max_batch_size: int = Field(4, ge=1, le=64, description="requests decoded together in one step")
    max_batch_tokens: int | None = Field(None, ge=1, description="prompt + budget positions in flight "
                                         "(default: max_batch_size x the model's max_seq_len)")
    stream_first_frames: int = Field(11, ge=1, le=256, description="frames before the first streamed chunk "
                                     "(~21.5 per second)")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads of the engine thread, the one "
                                      "thread that runs torch (default: torch's, one per core)")
    # Defaults for requests
    default_model: Literal["auto", "fish", "s1", "s2-pro", "piper"] = Field("auto", description="auto: the "
                                                            "first checkpoint's model (fish) if one loads, else "
                                                            "piper")
    model_map: Annotated[dict[str, str], NoDecode] = Field(default_factory=lambda: dict(FISH_MODEL_MAP), description="Fish Audio "
                                      "model names (the `model` header) -> the served model each means, as JSON "
                                      "or `name=model,...`; a target that is not served means the default model")
    default_voice: str | None = Field(None, description="saved voice used when a request names none")
    voice_map: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict, description="voice names -> the "
                                      "voice each means (a saved voice or `default`), as JSON or `name=voice,...`, "
                                      "laid over the built-in map in which every OpenAI voice name (alloy, ash, "
                                      "..., cedar) means the default voice; a saved voice of the same name wins")
    lite_voice: bool = Field(True, description="also load the bundled piper voice (the fallback when no "
                             "checkpoint is found); false saves its start-up time and memory")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log verbosity")
    # Testing
    fault_injection: bool = Field(False, description="testing only: a request whose text contains "
                                  "[[fault:error]] or [[fault:oom]] fails inside generation")

    @field_validator("model_map", "voice_map", mode="before")
    @classmethod
    def _pairs(cls, value: Any) -> Any:
        """`s2-pro=s1,drama-3=s1`, or a JSON object."""
        if isinstance(value, str) and value.lstrip().startswith("{"):
            try:
                return json.loads(value)
            except ValueError as exc:
                raise ValueError(f"not valid JSON: {exc}") from None
        if isinstance(value, str):
            pairs = [item.partition("=") for item in value.split(",") if item.strip()]
            if any(not sep or not k.strip() or not v.strip() for k, sep, v in pairs):
                raise ValueError("write the map as name=value pairs separated by commas, or as a JSON object")
            return {k.strip(): v.strip() for k, _, v in pairs}
        return value

    @field_validator("extra_checkpoints", mode="before")
    @classmethod
    def _paths(cls, value: Any) -> Any:
        """`DIR,DIR` (the environment's form), or a list."""
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @classmethod
    def load(cls, cli: dict[str, Any] | None = None, env: dict[str, str] | None = None,
             dotenv: str | Path | None = DOTENV) -> "Settings":
        """Build the settings from CLI values (None means not given), the environment and the .env file.

        Unknown `SHOAL_*` names (a typo must not be silent) are reported as warnings.
        """
        env = dict(os.environ if env is None else env)
        file_values = _read_dotenv(dotenv)
        known = {ENV_PREFIX + name.upper() for name in cls.model_fields}
        for name in sorted({*env, *file_values}):
            if name.upper().startswith(ENV_PREFIX) and name.upper() not in known:
                close = difflib.get_close_matches(name.upper(), known, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                warnings.warn(f"unknown setting {name} ignored{hint}", UnknownSettingWarning, stacklevel=2)
        given = {k: v for k, v in (cli or {}).items() if v is not None}
        merged_env = {k: v for k, v in file_values.items() if v is not None}
        merged_env.update(env)
        try:
            settings = _build(cls, given, merged_env)
        except ValidationError as exc:
            first = exc.errors()[0]
            name = ".".join(str(p) for p in first["loc"]) or "settings"
            flag = f" or --{name.replace('_', '-')}" if name in (cli or {}) else ""  # only flags the CLI has
            raise BadRequest(f"invalid setting {name} ({ENV_PREFIX}{name.upper()}{flag}): {first['msg']}") from None
        sources = {}
        for name in cls.model_fields:
            key = ENV_PREFIX + name.upper()
            if name in given:
                sources[name] = "cli"
            elif any(k.upper() == key for k in env):
                sources[name] = "env"
            elif any(k.upper() == key for k in file_values):
                sources[name] = str(dotenv)
            else:
                sources[name] = "default"
        object.__setattr__(settings, "_sources", sources)
        return settings

    def source(self, name: str) -> str:
        return getattr(self, "_sources", {}).get(name, "default")

    def describe(self) -> list[tuple[str, str, str]]:
        """(name, effective value, where it came from) for every setting; the API key is masked."""
        rows = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "***"
            rows.append((name, "" if value is None else str(value), self.source(name)))
        return rows


class UnknownSettingWarning(UserWarning):
    pass


def _read_dotenv(path: str | Path | None) -> dict[str, str | None]:
    if path is None or not Path(path).is_file():
        return {}
    return dict(dotenv_values(path))


def _build(cls: type[Settings], given: dict[str, Any], env: dict[str, str]) -> Settings:
    """Instantiate with CLI values as init arguments and `env` as the environment, ignoring the real
    environment and .env file (already merged into `env` by the caller)."""

    class _Scoped(cls):  # type: ignore[misc, valid-type]
        model_config = SettingsConfigDict(**{**cls.model_config, "env_file": None})

        @classmethod
        def settings_customise_sources(cls_, settings_cls, init_settings, env_settings, dotenv_settings,
                                       file_secret_settings):
            from pydantic_settings import EnvSettingsSource

            scoped_env = EnvSettingsSource(settings_cls, case_sensitive=False, env_prefix=ENV_PREFIX)
            scoped_env.env_vars = {k.lower(): v for k, v in env.items()}
            return (init_settings, scoped_env)

    built = _Scoped(**given)
    return cls.model_construct(**{name: getattr(built, name) for name in cls.model_fields})
