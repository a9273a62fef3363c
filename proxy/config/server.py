"""The server section: address, timeouts and limits, and the client keys (api_keys, api_keys_file) with
their names, models and rate limits."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .sections import http_url
from .strict import Strict, validation_problems
from .usage import BudgetConfig
from .yamlload import YamlProblem, load_yaml, read_text

# A key's name shows in logs and metrics (its value never does).
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class ApiKey:
    """A client key as the proxy uses it: a name (all that logs, metrics and errors ever show), the value
    clients send, and what it may do (None: no limit)."""

    name: str
    value: str = field(repr=False)
    models: tuple[str, ...] | None = None
    rpm: int | None = None
    concurrency: int | None = None
    # Its spending limits (None: the default budget, if any) and whether it may read the usage API.
    budget: BudgetConfig | None = field(default=None, compare=False)
    admin: bool = False
    # What the ledger records with each request, and the usage API groups and filters by as OpenAI's
    # project_id and user_id (None: null there).
    project: str | None = None
    user: str | None = None


def _env_from(context: Any) -> dict[str, str]:
    """The environment parse_config was given (os.environ when validated without one)."""
    env = context.get("env") if isinstance(context, dict) else None
    return dict(os.environ) if env is None else env


def _env_of(info: ValidationInfo) -> dict[str, str]:
    return _env_from(info.context)


class ApiKeyConfig(Strict):
    """One entry of server.api_keys (or of server.api_keys_file) written as a mapping."""

    # Default: key-<position> (file-key-<position> in api_keys_file).
    name: str | None = None
    # Exactly one of: the value itself, the environment variable holding it, a file holding it.
    key: str | None = None
    key_env: str | None = None
    key_file: str | None = None
    # Models this key may use (default: all); requests for others get 403.
    models: list[str] | None = Field(default=None, min_length=1)
    # Requests per minute (image calls and passed-through calls alike); default: no limit.
    rpm: int | None = Field(default=None, ge=1)
    # Image requests in flight at once; default: no limit.
    concurrency: int | None = Field(default=None, ge=1)
    # Spending limits (proxy/usage/budgets.py); default: usage.default_budget.
    budget: BudgetConfig | None = None
    # May read GET /v1/organization/usage/images and /v1/organization/costs.
    admin: bool = False
    # The project and the user (person or service) the key belongs to: each request's ledger record
    # carries them, and the usage API groups and filters by them (project_id, user_id). Default: null.
    project: str | None = None
    user: str | None = None
    _value: str = PrivateAttr(default="")

    @field_validator("name")
    @classmethod
    def _name_shape(cls, name: str | None) -> str | None:
        if name is not None and not _KEY_NAME.fullmatch(name):
            raise ValueError("a key's name is 1-64 letters, digits, '.', '_' or '-' (it shows in logs and "
                             "metrics)")
        return name

    @field_validator("project", "user")
    @classmethod
    def _label_shape(cls, value: str | None, info: ValidationInfo) -> str | None:
        # The same shape as a name: these show in the usage API's answers and the CLI's table.
        if value is not None and not _KEY_NAME.fullmatch(value):
            raise ValueError(f"a key's {info.field_name} is 1-64 letters, digits, '.', '_' or '-'")
        return value

    def model_post_init(self, context: Any) -> None:
        # Not a model_validator: that would rename this member of the `str | ApiKeyConfig` union in error
        # locations, and the paths in messages would lose their way. A ValueError here is a validation error.
        given = [f for f in ("key", "key_env", "key_file") if getattr(self, f) is not None]
        if len(given) != 1:
            got = f" (got {', '.join(given)})" if given else ""
            raise ValueError(f"give exactly one of key, key_env or key_file{got}")
        value: str | None
        if self.key is not None:
            value = self.key
        elif self.key_env is not None:
            value = _env_from(context).get(self.key_env)
            if value is None:
                raise ValueError(f"key_env: the environment variable {self.key_env} is not set")
        else:
            assert self.key_file is not None  # exactly one of the three is given (checked above)
            try:
                value = Path(self.key_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"key_file: cannot read {self.key_file}: "
                                 f"{getattr(e, 'strerror', None) or 'not UTF-8 text'}") from None
        value = value.strip()
        if not value:
            raise ValueError(f"the key is empty{f' ({given[0]})' if given[0] != 'key' else ''}")
        if self.name is not None and value == self.name:
            raise ValueError("the name must not be the key itself: names show in logs and metrics")
        if value in (self.project, self.user):  # they show in the usage API's answers
            raise ValueError("the project or user must not be the key itself: they show in usage reports")
        self._value = value

    def resolved(self, default_name: str) -> ApiKey:
        return ApiKey(self.name or default_name, self._value,
                      tuple(self.models) if self.models else None, self.rpm, self.concurrency,
                      self.budget, self.admin, self.project, self.user)


class _KeysFile(str):
    """server.api_keys_file after validation: still its path, with the keys read from it."""

    keys: list[ApiKey]


def _resolve_keys(entries: list[str | ApiKeyConfig], prefix: str) -> list[ApiKey]:
    """Entries -> ApiKeys, unnamed ones named by position; empty strings (an unset ${VAR:-}) are dropped."""
    keys = []
    for i, entry in enumerate(entries, 1):
        if isinstance(entry, str):
            if entry.strip():
                keys.append(ApiKey(f"{prefix}-{i}", entry.strip()))
        else:
            keys.append(entry.resolved(f"{prefix}-{i}"))
    return keys


def _check_unique(keys: list[ApiKey], where: str) -> None:
    names: dict[str, int] = {}
    values: set[str] = set()
    for key in keys:
        names[key.name] = names.get(key.name, 0) + 1
        if key.value in values:
            raise ValueError(f"the key named '{key.name}' has the same value as another key{where}")
        values.add(key.value)
    twice = [name for name, n in names.items() if n > 1]
    if twice:
        raise ValueError(f"two keys are named '{twice[0]}'{where}; give each key its own name")


class ServerConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # Bearer keys clients must send: strings, or mappings with a name, models and limits (ApiKeyConfig).
    # Empty = no auth (fine on loopback; `serve` refuses other addresses unless allow_unauthenticated).
    # After validation this holds the key values alone (every accepted value, api_keys_file's included);
    # the full entries are `keys`.
    api_keys: list[str | ApiKeyConfig] = Field(default_factory=list)
    # A YAML (or JSON) list of more entries of the same form, read at start-up.
    api_keys_file: str | None = None
    # Serve without keys on an address other than loopback.
    allow_unauthenticated: bool = False
    # When set, /metrics needs `Authorization: Bearer <metrics_key>`; otherwise it is open.
    metrics_key: str | None = None
    metrics_key_env: str | None = None
    # Slow clients (seconds): the whole request head must arrive within header_timeout; a body that sends
    # nothing for body_timeout is cut off (400); a client that takes none of its answer for send_timeout
    # is dropped; an idle keep-alive connection is closed after keepalive_timeout.
    header_timeout: float = Field(default=10, gt=0)
    body_timeout: float = Field(default=30, gt=0)
    send_timeout: float = Field(default=30, gt=0)
    keepalive_timeout: float = Field(default=15, gt=0)
    max_body_mb: float = Field(default=50, gt=0)
    request_timeout: float = Field(default=600, gt=0)
    # Base of the URLs handed out for response_format=url; default: the request's own host.
    public_base_url: str | None = None
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    # text: one readable line per record; json: one JSON object per line (time, level, logger, message,
    # request_id, trace_id and the request line's fields), for log collectors.
    log_format: Literal["text", "json"] = "text"
    # Model used when a request names none; default: the first model listed.
    default_model: str | None = None
    # On SIGTERM: seconds in-flight requests may take to finish before they are cancelled with an error.
    shutdown_grace: float = Field(default=30, ge=0)
    # How long a request waits for a route whose model is still loading before a 503 with Retry-After.
    max_load_wait: float = Field(default=120, ge=0)

    _keys: list[ApiKey] = PrivateAttr(default_factory=list)

    @property
    def keys(self) -> list[ApiKey]:
        """Every client key with its name, models and limits (api_keys, then api_keys_file's)."""
        return self._keys

    @field_validator("api_keys")
    @classmethod
    def _unique_keys(cls, entries: list[str | ApiKeyConfig]) -> list[str | ApiKeyConfig]:
        _check_unique(_resolve_keys(entries, "key"), "")
        return entries

    @field_validator("api_keys_file")
    @classmethod
    def _read_keys_file(cls, path: str | None, info: ValidationInfo) -> str | None:
        if not path:
            return None
        try:
            data = load_yaml(read_text(Path(path)), path)
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {path}: {getattr(e, 'strerror', None) or 'not UTF-8 text'}") from None
        except YamlProblem as e:
            raise ValueError("; ".join(e.lines)) from None
        if data is None:
            data = []
        if not isinstance(data, list):
            raise ValueError(f"{path} must hold a list of keys (strings, or mappings like api_keys entries)")
        entries: list[str | ApiKeyConfig] = []
        for i, item in enumerate(data):
            if isinstance(item, str):
                entries.append(item)
                continue
            if not isinstance(item, dict):  # never shown: an unquoted key may read as a number
                raise ValueError(f"{path}: {i}: each entry is a string or a mapping (quote keys that look "
                                 "like numbers)")
            try:
                entries.append(ApiKeyConfig.model_validate(item, context=info.context))
            except ValidationError as e:
                raise ValueError(f"{path}: " + "; ".join(validation_problems(ApiKeyConfig, e, (str(i),)))) from None
        keys = _resolve_keys(entries, "file-key")
        earlier = info.data.get("api_keys")
        _check_unique((_resolve_keys(earlier, "key") if earlier else []) + keys, " (in api_keys and this file)")
        found = _KeysFile(path)
        found.keys = keys
        return found

    @field_validator("metrics_key")
    @classmethod
    def _empty_metrics_key(cls, value: str | None) -> str | None:
        return (value.strip() or None) if value is not None else None

    @field_validator("metrics_key_env")
    @classmethod
    def _metrics_key_from_env(cls, name: str | None, info: ValidationInfo) -> str | None:
        if not name:
            return None
        if info.data.get("metrics_key"):
            raise ValueError("give metrics_key or metrics_key_env, not both")
        if not _env_of(info).get(name, "").strip():
            raise ValueError(f"the environment variable {name} is not set")
        return name

    @model_validator(mode="after")
    def _collect_keys(self, info: ValidationInfo) -> ServerConfig:
        self._keys = _resolve_keys(self.api_keys, "key")
        if isinstance(self.api_keys_file, _KeysFile):
            self._keys += self.api_keys_file.keys
        self.api_keys = [key.value for key in self._keys]
        if self.metrics_key_env:
            self.metrics_key = _env_of(info)[self.metrics_key_env].strip()
        return self

    @field_validator("host")
    @classmethod
    def _host_given(cls, host: str) -> str:
        # An unset ${VAR} reads as "", which would listen on every address: say so instead.
        if not host.strip():
            raise ValueError("empty: give an address (127.0.0.1: this machine only, 0.0.0.0: every address)")
        return host.strip()

    @field_validator("public_base_url", "default_model")
    @classmethod
    def _empty_is_unset(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.field_name == "public_base_url":
            return http_url(value, "https://images.example.com")
        return value or None

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_any_case(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value
