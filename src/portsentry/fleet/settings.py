"""The fleet's settings from the configuration: where Redis is, who this host is, the signing key
and the password (both read from files here, never logged), which hosts to accept, the rate cap.

`FleetSettings` holds secrets, so its repr leaves them out, and `redacted` gives the URL without
any password for status lines and logs.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass, field
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from portsentry.config.settings import Config
from portsentry.fleet.decision import HOST_ID

# Host ids the ban store uses for its own origins: a peer by that name would be taken for us.
RESERVED_IDS = frozenset({"local", "local-only"})
SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster")
MIN_KEY_BYTES = 16
_MAX_SECRET_BYTES = 4096


@dataclass(frozen=True)
class FleetSettings:
    url: str = field(repr=False)  # may carry a password; see `redacted`
    name: str
    host_id: str
    key: bytes = field(repr=False)
    password: str | None = field(default=None, repr=False)
    accept_hosts: frozenset[str] | None = None  # None: every host holding the key
    ban_rate_limit: int = 0

    @property
    def redacted(self) -> str:
        return redact(self.url)

    def keys(self) -> tuple[str, str, str, str]:
        """The stream, the active-bans hash, their expiry set and the hosts' marks: one hash tag,
        one Cluster slot."""
        tag = f"portsentry:{{{self.name}}}"
        return f"{tag}:decisions", f"{tag}:bans", f"{tag}:expiry", f"{tag}:hosts"


def redact(url: str) -> str:
    """`url` without a password, in the user part or among the options (redis-py takes
    `?password=` and `?ssl_password=` as well); user names stay: they help an admin."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        host, user = netloc.rsplit("@", 1)[1], parts.username or ""
        netloc = f"{user}:***@{host}" if user else f"***@{host}"
    query = "&".join(_hide(option) for option in parts.query.split("&"))
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _hide(option: str) -> str:
    name, equals, _value = option.partition("=")
    return f"{name}=***" if equals and "password" in unquote_plus(name).lower() else option


def read_secret(config: Config, key: str, path: str, what: str) -> bytes:
    """A secret file's bytes without the trailing newline; refused when others may read it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as error:
        raise config.error(key, f"cannot read the {what} {path}: {error.strerror or error}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise config.error(key, f"{path} is not a regular file")
        if info.st_mode & 0o077:
            raise config.error(key, f"{path} may be read by others (mode {info.st_mode & 0o777:o}); "
                               "chmod 600 it")
        data = os.read(fd, _MAX_SECRET_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_SECRET_BYTES:
        raise config.error(key, f"{path} is larger than {_MAX_SECRET_BYTES} bytes")
    return data.rstrip(b"\r\n")


def fleet_settings(config: Config, hostname: str | None = None) -> FleetSettings | None:
    """The fleet configuration, or None when FLEET_REDIS_URL is empty; ConfigError naming the key
    for anything that would make the fleet unsafe or unusable."""
    url = config.fleet_redis_url
    if not url:
        return None
    if urlsplit(url).scheme not in SCHEMES:
        raise config.error("FLEET_REDIS_URL",
                           f"{redact(url)!r}: the scheme must be one of {', '.join(SCHEMES)}")
    host_id = config.fleet_host_id or (hostname if hostname is not None else socket.gethostname())
    host_id = host_id.split(".", 1)[0] if not config.fleet_host_id else host_id
    if not HOST_ID.fullmatch(host_id) or host_id in RESERVED_IDS:
        raise config.error("FLEET_HOST_ID", f"{host_id!r} is not a usable host id (letters, digits, '.', "
                           "'_', '-', at most 64; not 'local')")
    if not config.fleet_key_file:
        raise config.error("FLEET_KEY_FILE", "is required with FLEET_REDIS_URL: every decision is signed")
    key = read_secret(config, "FLEET_KEY_FILE", config.fleet_key_file, "fleet key")
    if len(key) < MIN_KEY_BYTES:
        raise config.error("FLEET_KEY_FILE", f"the key must be at least {MIN_KEY_BYTES} bytes "
                           "(e.g. openssl rand -hex 32)")
    password = None
    if config.fleet_password_file:
        secret = read_secret(config, "FLEET_PASSWORD_FILE", config.fleet_password_file, "Redis password")
        try:
            password = secret.decode("utf-8")
        except UnicodeDecodeError:
            raise config.error("FLEET_PASSWORD_FILE", "the password is not UTF-8 text") from None
    accept = frozenset(config.fleet_accept_hosts) if config.fleet_accept_hosts else None
    return FleetSettings(url, config.fleet_name, host_id, key, password, accept, config.fleet_ban_rate_limit)
