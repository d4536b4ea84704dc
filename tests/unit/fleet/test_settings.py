"""The fleet's settings: secrets read from files and never shown, errors naming the key."""

from __future__ import annotations

import os

import pytest

from portsentry.config.settings import ConfigError, parse_config
from portsentry.fleet.settings import fleet_settings, redact


def config(tmp_path, **keys: str):
    text = "\n".join(f'{key}="{value}"' for key, value in keys.items())
    return parse_config(text, str(tmp_path / "portsentry.conf")).config


def secret(tmp_path, name: str, text: str, mode: int = 0o600) -> str:
    path = tmp_path / name
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def test_no_url_no_fleet(tmp_path):
    assert fleet_settings(config(tmp_path)) is None


def test_settings_with_secrets_from_files_that_never_show(tmp_path):
    key = secret(tmp_path, "key", "k" * 40 + "\n")
    password = secret(tmp_path, "pass", "hunter2-long-password\n")
    settings = fleet_settings(config(tmp_path, FLEET_REDIS_URL="rediss://ps@10.9.9.9:6380/0",
                                     FLEET_KEY_FILE=key, FLEET_PASSWORD_FILE=password,
                                     FLEET_ACCEPT_HOSTS="web1, web2", FLEET_BAN_RATE_LIMIT="100"),
                              hostname="web3.example.org")
    assert settings is not None
    assert (settings.host_id, settings.name, settings.key, settings.password) == (
        "web3", "portsentry", b"k" * 40, "hunter2-long-password")
    assert settings.accept_hosts == frozenset({"web1", "web2"}) and settings.ban_rate_limit == 100
    assert "hunter2" not in repr(settings) and "kkkk" not in repr(settings)
    assert settings.keys() == ("portsentry:{portsentry}:decisions", "portsentry:{portsentry}:bans",
                               "portsentry:{portsentry}:expiry", "portsentry:{portsentry}:hosts")
    assert redact("redis://ps:hunter2@h:1/0") == "redis://ps:***@h:1/0"
    assert redact("redis://:hunter2@h:1/0") == "redis://***@h:1/0"
    assert redact("redis://h:1/0") == "redis://h:1/0"


def test_a_password_among_the_urls_options_is_hidden_too(tmp_path):
    # redis-py takes `?password=` (and the TLS key's `ssl_password`) as readily as the user part;
    # status and the log showed them as written.
    assert redact("redis://h:1/0?password=hunter2&db=1") == "redis://h:1/0?password=***&db=1"
    assert redact("rediss://ps@h/0?ssl_ca_certs=/etc/ca.pem&ssl_password=hunter2") == (
        "rediss://ps@h/0?ssl_ca_certs=/etc/ca.pem&ssl_password=***")
    assert "hunter2" not in redact("redis+sentinel://u:hunter1@a,b/main?Pass%77ord=hunter2")
    key = secret(tmp_path, "key", "k" * 40)
    settings = fleet_settings(config(tmp_path, FLEET_REDIS_URL="redis://h:6379/0?password=hunter2",
                                     FLEET_KEY_FILE=key))
    assert settings is not None and "hunter2" not in settings.redacted


@pytest.mark.parametrize(("keys", "message"), [
    ({"FLEET_REDIS_URL": "http://h/"}, "FLEET_REDIS_URL: 'http://h/': the scheme must be one of"),
    ({"FLEET_REDIS_URL": "redis://h/"}, "FLEET_KEY_FILE: is required with FLEET_REDIS_URL"),
    ({"FLEET_REDIS_URL": "redis://h/", "FLEET_HOST_ID": "local", "FLEET_KEY_FILE": "KEY"},
     "FLEET_HOST_ID: 'local' is not a usable host id"),
    ({"FLEET_REDIS_URL": "redis://h/", "FLEET_KEY_FILE": "SHORT"}, "the key must be at least 16 bytes"),
    ({"FLEET_REDIS_URL": "redis://h/", "FLEET_KEY_FILE": "OPEN"}, "may be read by others (mode 644)"),
    ({"FLEET_REDIS_URL": "redis://h/", "FLEET_KEY_FILE": "/nonexistent/key"}, "cannot read the fleet key"),
])
def test_unsafe_or_unusable_settings_are_errors_naming_the_key(tmp_path, keys, message):
    files = {"KEY": secret(tmp_path, "key", "k" * 32), "SHORT": secret(tmp_path, "short", "abc"),
             "OPEN": secret(tmp_path, "open", "k" * 32, 0o644)}
    keys = {name: files.get(value, value) for name, value in keys.items()}
    with pytest.raises(ConfigError) as caught:
        fleet_settings(config(tmp_path, **keys), hostname="h")
    assert message in str(caught.value)


def test_names_that_would_leave_the_hash_tag_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="FLEET_NAME: 'a}b' is not a fleet name"):
        config(tmp_path, FLEET_NAME="a}b")
    with pytest.raises(ConfigError, match="FLEET_ACCEPT_HOSTS: 'bad/host' is not a host id"):
        config(tmp_path, FLEET_ACCEPT_HOSTS="ok bad/host")
