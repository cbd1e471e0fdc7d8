"""One settings system: CLI > SHOAL_* environment > .env > defaults."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from shoal.errors import BadRequest
from shoal.settings import Settings, UnknownSettingWarning


def test_precedence_and_sources(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("SHOAL_PORT=7000\nSHOAL_HOST=10.0.0.1\nSHOAL_MAX_TEXT_LENGTH=99\n")
    s = Settings.load(cli={"host": "127.0.0.2", "port": None}, env={"SHOAL_PORT": "7001"}, dotenv=dotenv)
    assert (s.host, s.source("host")) == ("127.0.0.2", "cli")
    assert (s.port, s.source("port")) == (7001, "env")
    assert (s.max_text_length, s.source("max_text_length")) == (99, str(dotenv))
    assert s.source("queue_size") == "default"


def test_api_key_is_secret_and_masked(tmp_path):
    s = Settings.load(env={"SHOAL_API_KEY": "hunter2"}, dotenv=None)
    assert isinstance(s.api_key, SecretStr) and s.api_key.get_secret_value() == "hunter2"
    assert ("api_key", "***", "env") in s.describe()
    assert "hunter2" not in repr(s)


def test_unknown_variables_warn_with_a_suggestion():
    with pytest.warns(UnknownSettingWarning, match="SHOAL_QUEUE_SIZ.*did you mean SHOAL_QUEUE_SIZE"):
        Settings.load(env={"SHOAL_QUEUE_SIZ": "3"}, dotenv=None)


@pytest.mark.parametrize("env, needle", [
    ({"SHOAL_PORT": "70000"}, "port"),
    ({"SHOAL_QUEUE_SIZE": "0"}, "queue_size"),
    ({"SHOAL_LOG_LEVEL": "loud"}, "log_level"),
    ({"SHOAL_DEFAULT_MODEL": "gpt"}, "default_model"),
    ({"SHOAL_MAX_SEQ_LEN": "2048"}, "max_seq_len"),
    ({"SHOAL_MODEL_MAP": "s2-pro"}, "model_map"),
    ({"SHOAL_MODEL_MAP": "{not json"}, "model_map"),
    ({"SHOAL_MODEL_MAP": "=s1"}, "model_map"),
])
def test_invalid_values_are_bad_requests_naming_the_setting(env, needle):
    with pytest.raises(BadRequest, match=needle):
        Settings.load(env=env, dotenv=None)


def test_the_real_environment_is_not_read_when_env_is_given(monkeypatch):
    monkeypatch.setenv("SHOAL_PORT", "1234")
    assert Settings.load(env={}, dotenv=None).port == 8080


def test_the_max_seq_len_floor_is_the_prompt_rule_s_headroom():
    from shoal import settings
    from shoal.fish import prompt

    assert settings.GENERATION_HEADROOM == prompt.GENERATION_HEADROOM
    assert Settings.load(env={"SHOAL_MAX_SEQ_LEN": "4096"}, dotenv=None).max_seq_len == 4096


def test_an_invalid_value_names_the_flag_only_where_the_cli_has_one():
    with pytest.raises(BadRequest) as err:
        Settings.load(cli={"port": None}, env={"SHOAL_PORT": "70000"}, dotenv=None)
    assert "(SHOAL_PORT or --port)" in str(err.value)
    with pytest.raises(BadRequest) as err:
        Settings.load(cli={"port": None}, env={"SHOAL_QUEUE_SIZE": "0"}, dotenv=None)
    assert "(SHOAL_QUEUE_SIZE)" in str(err.value)


@pytest.mark.parametrize("value", ["s2-pro=piper, drama-3=s1", '{"s2-pro": "piper", "drama-3": "s1"}'])
def test_the_model_map_takes_pairs_or_json(value):
    assert Settings.load(env={"SHOAL_MODEL_MAP": value}, dotenv=None).model_map == {"s2-pro": "piper",
                                                                                   "drama-3": "s1"}
