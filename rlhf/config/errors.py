"""The one error the config layer raises."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config key is unknown, mistyped or impossible; the message names the key and the file."""
