"""The one error type of the configuration: a ConfigError names file, line and key, for the
parser (settings.py), the ignore list and every later stage that finds a setting it cannot use."""

from __future__ import annotations


def located(source: str, line: int | None, key: str | None, message: str) -> str:
    where = source if line is None else f"{source}:{line}"
    return ": ".join(part for part in (where, key, message) if part is not None)


class ConfigError(Exception):
    """A configuration problem that stops PortSentry from starting."""

    def __init__(self, source: str, line: int | None, key: str | None, message: str) -> None:
        super().__init__(source, line, key, message)
        self.source = source
        self.line = line
        self.key = key
        self.message = message

    def __str__(self) -> str:
        return located(self.source, self.line, self.key, self.message)
