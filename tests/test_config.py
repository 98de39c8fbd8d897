"""Configuration: precedence, validation messages, and secrets kept out of text."""

from __future__ import annotations

import io
import logging

import pytest

from config import ConfigError, RedactingFilter, install_log_redaction, load_config, redact, redact_url

TOKEN = "1234567:AAFakeTokenForConfigTests_0123456789"


def write(tmp_path, text):
    path = tmp_path / "dims.toml"
    path.write_text(text)
    return path


def test_environment_overrides_the_file_and_the_file_overrides_defaults(tmp_path):
    path = write(tmp_path, '[database]\nurl = "postgresql://file/db"\npool_max = 7\n'
                           '[telegram]\napi_url = "http://file/bot"\n')
    from_file = load_config(path, env={})
    assert (from_file.database.url, from_file.database.pool_max, from_file.telegram.api_url) == \
        ("postgresql://file/db", 7, "http://file/bot")
    from_env = load_config(path, env={"DATABASE_URL": "postgresql://env/db", "TELEGRAM_API_URL": "http://env/bot",
                                      "DIMS_SOCKET": "/run/x.sock", "DIMS_DATA_DIR": str(tmp_path / "d")})
    assert (from_env.database.url, from_env.telegram.api_url) == ("postgresql://env/db", "http://env/bot")
    assert str(from_env.socket_path) == "/run/x.sock" and from_env.data_dir == tmp_path / "d"
    assert load_config(path, env={"DIMS_DATA_DIR": "x"}, data_dir=tmp_path / "flag").data_dir == tmp_path / "flag"


def test_defaults_with_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(env={})
    assert config.path is None and config.bots == () and config.database.url is None
    assert config.data_dir == tmp_path / "var" and config.socket_path == tmp_path / "var" / "dims.sock"
    assert config.telegram.api_url == "https://api.telegram.org/bot"


def test_dims_config_variable_and_local_dims_toml_are_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, '[database]\npool_max = 2\n')
    assert load_config(env={}).database.pool_max == 2
    other = tmp_path / "other.toml"
    other.write_text('[database]\npool_max = 3\n')
    assert load_config(env={"DIMS_CONFIG": str(other)}).database.pool_max == 3


def test_bots_read_tokens_from_the_environment(tmp_path):
    path = write(tmp_path, '[[bots]]\nname = "alpha"\ntoken_env = "ALPHA_TOKEN"\nadmins = [42]\n'
                           'roster_tags = ["blonde"]\n[[bots]]\nname = "beta"\ntoken = "1:abc"\n'
                           'display_name = "Beta Bot"\n')
    config = load_config(path, env={"ALPHA_TOKEN": TOKEN})
    alpha, beta = config.bots
    assert (alpha.token, alpha.admins, alpha.roster_tags, alpha.display_name) == (TOKEN, (42,), ("blonde",), "Alpha")
    assert beta.display_name == "Beta Bot"
    assert config.bot("beta") is beta
    with pytest.raises(ConfigError, match=r"bot 'gamma' is not configured \(known: alpha, beta\)"):
        config.bot("gamma")
    assert TOKEN not in repr(config) and TOKEN in config.secrets()


def test_bot_token_alone_makes_one_bot_named_main():
    (bot,) = load_config(env={"BOT_TOKEN": TOKEN}).bots
    assert bot.name == "main" and bot.token == TOKEN


@pytest.mark.parametrize("text, message", [
    ('[[bots]]\nname = "a"\ntoken = "1:x"\n[[bots]]\nname = "a"\ntoken = "2:y"\n', "bots[1].name: 'a' is used by another bot"),
    ('[[bots]]\nname = "a"\n', "bots[0]: missing token_env (or token)"),
    ('[[bots]]\nname = "a"\ntoken = "nonsense"\n', "bots[0].token: does not look like a Telegram bot token"),
    ('[[bots]]\nname = "a"\ntoken = "1:x"\ntoken_env = "X"\n', "set either token or token_env, not both"),
    ('[[bots]]\nname = "a"\ntoken = "1:x"\nadmins = ["me"]\n', "bots[0].admins: expected a list of Telegram user ids"),
    ('[database]\npool_min = 5\npool_max = 2\n', "database.pool_min: is 5, larger than database.pool_max (2)"),
    ('[database]\nconnect_timeout = true\n', "database.connect_timeout: expected a number, got a boolean"),
    ('[telegram]\napi_url = "ftp://x"\n', "telegram.api_url: expected an http(s) URL"),
    ('[telegram]\nretry_for = 0\n', "telegram.retry_for: must be greater than 0, got 0"),
    ('database = 3\n', "database: expected a table [database]"),
    ('colour = "blue"\n', "colour: unknown key"),
    ('[supervisor]\nbackoff_initial = 5\nbackoff_max = 1\n', "supervisor.backoff_initial: is 5, larger than "
                                                           "supervisor.backoff_max (1)"),
])
def test_invalid_values_name_the_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value).startswith(str(path)) and message in str(caught.value)


def test_bad_token_error_never_shows_the_token(tmp_path):
    path = write(tmp_path, '[[bots]]\nname = "a"\ntoken_env = "A_TOKEN"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={"A_TOKEN": "not-a-token-but-secret"})
    assert "not-a-token-but-secret" not in str(caught.value) and "A_TOKEN" in str(caught.value)


def test_redaction_of_urls_tokens_and_log_records():
    assert redact_url("postgresql://u:pw@h:5/db") == "postgresql://u:***@h:5/db"
    assert redact_url("host=h password='p w' user=u") == "host=h password=*** user=u"
    url = f"https://api.telegram.org/bot{TOKEN}/getUpdates"
    assert TOKEN not in redact(url) and "1234567" in redact(url)

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("test_redaction")
    logger.addHandler(handler)
    handler.addFilter(RedactingFilter(["short-secret-pw"]))
    try:
        logger.warning("HTTP Request: POST %s", url)
        logger.warning("password is %s", "short-secret-pw")
        try:
            raise RuntimeError(f"failed {url}")
        except RuntimeError:
            logger.exception("boom")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert TOKEN not in text and "short-secret-pw" not in text and text.count("1234567:***") == 2


def test_install_log_redaction_covers_every_root_handler():
    root = logging.getLogger()
    handler = logging.StreamHandler(io.StringIO())
    root.addHandler(handler)
    try:
        first = install_log_redaction(["alpha-secret"])
        second = install_log_redaction(["beta-secret"])
        assert first is second and {"alpha-secret", "beta-secret"} <= set(first.secrets)
        assert first in handler.filters
    finally:
        root.removeHandler(handler)
