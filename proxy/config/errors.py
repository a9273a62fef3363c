"""The one error a config that cannot be used raises."""


class ConfigError(Exception):
    """models.yaml cannot be used; the message says where and why."""
