"""models.yaml -> typed config, with ${VAR} and ${VAR:-default} expansion and clear errors.

Strict: an unknown key anywhere (provider options included, per provider kind) is an error that names
its path and suggests the nearest known key. Every problem is one line: `path: what is wrong`.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .sizing import MAX_SIDE, SizeTable, parse_pixels

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """models.yaml cannot be used; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


def _env_from(context: Any) -> dict[str, str]:
    """The environment parse_config was given (os.environ when validated without one)."""
    env = context.get("env") if isinstance(context, dict) else None
    return dict(os.environ) if env is None else env


def _env_of(info: ValidationInfo) -> dict[str, str]:
    return _env_from(info.context)


class ApiKeyConfig(_Strict):
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
    _value: str = PrivateAttr(default="")

    @field_validator("name")
    @classmethod
    def _name_shape(cls, name: str | None) -> str | None:
        if name is not None and not _KEY_NAME.fullmatch(name):
            raise ValueError("a key's name is 1-64 letters, digits, '.', '_' or '-' (it shows in logs and "
                             "metrics)")
        return name

    def model_post_init(self, context: Any) -> None:
        # Not a model_validator: that would rename this member of the `str | ApiKeyConfig` union in error
        # locations, and the paths in messages would lose their way. A ValueError here is a validation error.
        given = [f for f in ("key", "key_env", "key_file") if getattr(self, f) is not None]
        if len(given) != 1:
            got = f" (got {', '.join(given)})" if given else ""
            raise ValueError(f"give exactly one of key, key_env or key_file{got}")
        if self.key is not None:
            value = self.key
        elif self.key_env is not None:
            value = _env_from(context).get(self.key_env)
            if value is None:
                raise ValueError(f"key_env: the environment variable {self.key_env} is not set")
        else:
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
        self._value = value

    def resolved(self, default_name: str) -> ApiKey:
        return ApiKey(self.name or default_name, self._value,
                      tuple(self.models) if self.models else None, self.rpm, self.concurrency)


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


class ServerConfig(_Strict):
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
    # nothing for body_timeout is cut off (400); an idle keep-alive connection is closed after
    # keepalive_timeout.
    header_timeout: float = Field(default=10, gt=0)
    body_timeout: float = Field(default=30, gt=0)
    keepalive_timeout: float = Field(default=15, gt=0)
    max_body_mb: float = Field(default=50, gt=0)
    request_timeout: float = Field(default=600, gt=0)
    # Base of the URLs handed out for response_format=url; default: the request's own host.
    public_base_url: str | None = None
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
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
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {path}: {getattr(e, 'strerror', None) or 'not UTF-8 text'}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {_yaml_problem(e)}") from None
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

    @field_validator("public_base_url", "default_model")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_any_case(cls, value):
        return value.lower() if isinstance(value, str) else value


_S3_ONLY = ("bucket", "endpoint_url", "region", "prefix", "access_key_id_env", "secret_access_key_env",
            "presign", "public_url", "serve_via_proxy", "timeout")


class StoreConfig(_Strict):
    """Where images behind response_format=url live: a folder (filesystem) or an S3-compatible bucket."""

    kind: Literal["filesystem", "s3"] = "filesystem"
    path: str = "var/images"
    ttl_seconds: float = Field(default=3600, gt=0)
    # Upstream URLs expire and reveal the provider: download and serve them ourselves by default.
    rehost_upstream_urls: bool = True
    max_download_mb: float = 64
    # kind: s3 (any S3-compatible server: AWS, MinIO, R2, Ceph...). Credentials: the variables named by
    # access_key_id_env / secret_access_key_env, else the standard AWS_* variables and instance roles.
    bucket: str | None = None
    endpoint_url: str | None = None
    region: str | None = None
    prefix: str = ""
    access_key_id_env: str | None = None
    secret_access_key_env: str | None = None
    # url answers: presigned GET links valid for ttl_seconds (true), or public_url + name (false, for a
    # public bucket or a CDN; default: the bucket's own path-style URL).
    presign: bool = True
    public_url: str | None = None
    # url answers point at the proxy's own /images/<id>, streamed from the bucket (clients never see S3).
    serve_via_proxy: bool = False
    # Seconds one call to the bucket may take (an upload of a large image included).
    timeout: float = Field(default=30, gt=0)

    @field_validator("bucket", "endpoint_url", "region", "access_key_id_env", "secret_access_key_env",
                     "public_url")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @model_validator(mode="after")
    def _kind_options(self) -> StoreConfig:
        if self.kind == "s3" and not self.bucket:
            raise ValueError("kind: s3 needs a bucket")
        if self.kind == "filesystem":
            given = [k for k in _S3_ONLY if k in self.model_fields_set]
            if given:
                raise ValueError(f"{given[0]} is an option of kind: s3 (this store is kind: filesystem)")
        return self


class StateConfig(_Strict):
    """Idempotency records and shared counters: in this process's memory, or in Redis (shared by every
    process and machine that uses the same redis_url)."""

    # redis://[user:password@]host:port/db, rediss:// for TLS; empty: in memory.
    redis_url: str | None = None
    key_prefix: str = "qip:"
    # Seconds a Redis call may take (connect included) before the request gets 503 state_unavailable.
    socket_timeout: float = Field(default=2, gt=0)
    # How long an Idempotency-Key's answer is kept, and the largest answer kept (b64_json answers are big).
    idempotency_ttl: float = Field(default=86400, gt=0)
    idempotency_max_mb: float = Field(default=64, ge=0)
    # In memory only: at most this many answers and this many MB of them (least recently used go first).
    memory_max_records: int = Field(default=10000, ge=1)
    memory_max_mb: float = Field(default=512, ge=0)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value or None


class FetchConfig(_Strict):
    """Where the proxy may fetch images from on a client's or an upstream's say-so (SSRF rules)."""

    # Hosts (exact, or "*.example.com") that edit requests may name in images[].image_url; empty: none,
    # only data: URLs and uploads.
    input_image_hosts: list[str] = Field(default_factory=list)
    # Hosts upstream image URLs may point at (besides the answering provider's own origin); empty: any
    # public host.
    upstream_image_hosts: list[str] = Field(default_factory=list)
    # CIDRs let through although not public (an on-prem image host), e.g. ["10.1.0.0/16"].
    allowed_networks: list[str] = Field(default_factory=list)
    allow_http: bool = False


class RoutingConfig(_Strict):
    """Retries within a route and the per-route circuit breaker."""

    # Extra attempts on the same route after a retryable failure (connect error, timeout, 429, 5xx,
    # a malformed answer or a bad image), before moving on to the next route.
    retries: int = Field(default=2, ge=0, le=10)
    # Exponential backoff with full jitter: a random wait in [0, min(backoff_max, backoff_base * 2**i)].
    backoff_base: float = Field(default=0.5, ge=0)
    backoff_max: float = Field(default=8, ge=0)
    # A route that failed this many requests in a row is skipped for breaker_cooldown seconds, then
    # one probe request at a time is let through (half-open) until one succeeds.
    breaker_threshold: int = Field(default=5, ge=1)
    breaker_cooldown: float = Field(default=30, ge=0)


class PassthroughConfig(_Strict):
    base_url: str | None = None
    api_key: str | None = None
    timeout: float = Field(default=600, gt=0)

    @property
    def enabled(self) -> bool:
        return bool(self.base_url)


class ProviderConfig(BaseModel):
    """kind plus options that belong to that kind; each provider reads its own.

    Which options a kind knows, and their types, is the provider class's `options_schema`; parse_config
    checks them (proxy.providers.check_options) and keeps the typed values.
    """

    model_config = ConfigDict(extra="allow")
    kind: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RouteConfig(_Strict):
    provider: str
    # The model name the upstream knows; default: the proxy's model name.
    model: str | None = None
    # Defaults merged into every request on this route (request fields win).
    params: dict[str, Any] = Field(default_factory=dict)
    timeout: float | None = Field(default=None, gt=0)
    max_images_per_call: int | None = Field(default=None, ge=1)
    # Overrides routing.retries for this route.
    retries: int | None = Field(default=None, ge=0, le=10)
    # Fields never sent on this route (the client's or the route's params): e.g. [negative_prompt, go_fast].
    drop: list[str] = Field(default_factory=list)

    @field_validator("drop")
    @classmethod
    def _droppable(cls, names: list[str]) -> list[str]:
        core = {"prompt", "model", "size", "n", "response_format", "stream"}
        if bad := sorted(set(names) & core):
            raise ValueError(f"{', '.join(bad)} cannot be dropped: every route needs them")
        return names


class SizeTableConfig(_Strict):
    default: str = "1024x1024"
    tiers: dict[str, dict[str, str]]
    max_side: int = Field(default=MAX_SIDE, ge=1, le=MAX_SIDE)
    max_pixels: int | None = Field(default=None, ge=1)
    # n x width x height per request; default 4 x max_pixels.
    max_total_pixels: int | None = Field(default=None, ge=1)

    @field_validator("tiers", mode="before")
    @classmethod
    def _tier_labels_as_text(cls, tiers):
        # YAML reads an unquoted megapixel tier such as `0.25:` as a number.
        return {str(k): v for k, v in tiers.items()} if isinstance(tiers, dict) else tiers

    def build(self) -> SizeTable:
        def pixels(text: str) -> tuple[int, int]:
            wh = parse_pixels(text)
            if wh is None:
                raise ValueError(f"'{text}' is not a size like '1024x1024'")
            if not all(1 <= side <= self.max_side for side in wh):
                raise ValueError(f"'{text}': each side must be between 1 and {self.max_side} pixels")
            return wh

        return SizeTable(
            tiers={t: {r: pixels(s) for r, s in ratios.items()} for t, ratios in self.tiers.items()},
            default=pixels(self.default),
            max_side=self.max_side,
            max_pixels=self.max_pixels,
            max_total_pixels=self.max_total_pixels,
        )


class ModelConfig(_Strict):
    routes: list[RouteConfig] = Field(min_length=1)
    sizes: str | SizeTableConfig
    description: str | None = None
    owned_by: str = "qwen-image-proxy"
    # An edit model (/v1/images/edits) takes 1 to this many input images; 0: it does not edit.
    max_input_images: int = Field(default=0, ge=0, le=16)

    @field_validator("routes", mode="before")
    @classmethod
    def _route_shorthand(cls, routes):
        # "- lumenfall" is short for "- provider: lumenfall".
        if isinstance(routes, list):
            return [{"provider": r} if isinstance(r, str) else r for r in routes]
        return routes


class Config(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    passthrough: PassthroughConfig = Field(default_factory=PassthroughConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    fetch: FetchConfig = Field(default_factory=FetchConfig)
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    size_tables: dict[str, SizeTableConfig] = Field(default_factory=dict)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    _missing_vars: dict[str, list[str]] = PrivateAttr(default_factory=dict)

    @property
    def missing_vars(self) -> dict[str, list[str]]:
        """Variables that ${VAR} named but the environment lacks, per provider (filled by parse_config)."""
        return self._missing_vars

    @missing_vars.setter
    def missing_vars(self, value: dict[str, list[str]]) -> None:
        self._missing_vars = value

    def size_table(self, model: str) -> SizeTable:
        sizes = self.models[model].sizes
        return (self.size_tables[sizes] if isinstance(sizes, str) else sizes).build()


# ---- error messages -------------------------------------------------------------------------------


def _secret(path: list[str]) -> bool:
    """Whether the value at this path may be a secret: then an error never shows it."""
    return any(part.lower().endswith(("key", "keys", "secret", "token", "password")) for part in path)


def suggest(word: str, known: Iterable[str]) -> str:
    """'; did you mean 'x'?' for the nearest of `known`, else an empty string."""
    match = difflib.get_close_matches(str(word), [str(k) for k in known], n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


def _unknown_key(key: str, known: Iterable[str]) -> str:
    known = sorted(known)
    hint = suggest(key, known)
    return "unknown key" + (hint or (f"; known keys: {', '.join(known)}" if known else ""))


def _type_name(tp: Any) -> str | None:
    return getattr(tp, "__name__", None)


def _without_none(tp: Any) -> Any:
    if get_origin(tp) in (Union, UnionType):
        members = [m for m in get_args(tp) if m is not type(None)]
        if len(members) == 1:
            return members[0]
    return tp


def _walk(root: type[BaseModel], loc: tuple) -> tuple[list[str], type[BaseModel] | None, tuple | None]:
    """Follow a pydantic error location through the model's types.

    Returns the readable path (pydantic's union member tags dropped), the model whose field the last
    key would be (for "did you mean"), and the last union passed: (its path, the member tag, whether
    the error is about the whole value, i.e. nothing follows the tag).
    """
    path: list[str] = []
    holder: type[BaseModel] | None = None
    branch = None
    tp: Any = root
    parts = list(loc)
    while parts:
        tp = _without_none(tp)
        origin = get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            holder, part = tp, parts.pop(0)
            path.append(str(part))
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            tp = field.annotation if field else None
            continue
        holder = None
        if origin in (Union, UnionType):
            tag = parts.pop(0)
            branch = (tuple(path), tag, not parts)
            tp = next((m for m in get_args(tp) if _type_name(m) == tag), None)
            continue
        path.append(str(parts.pop(0)))
        tp = get_args(tp)[-1] if origin in (dict, list) else None
    return path, holder, branch


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validation_problems(root: type[BaseModel], error: ValidationError, prefix: Iterable[str] = (),
                        extra_known: Iterable[str] = ()) -> list[str]:
    """One 'path: message' line per problem pydantic found, with suggestions for unknown keys."""
    entries = []
    for err in error.errors():
        path, holder, branch = _walk(root, err["loc"])
        path = [*prefix, *path]
        kind = err["type"]
        if kind == "extra_forbidden":
            known = set(holder.model_fields) if holder else set()
            if holder is root:
                known |= set(extra_known)
            msg = _unknown_key(path[-1], known)
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if kind.endswith("_parsing"):  # "..., unable to parse string as an integer": the input says it
                msg = msg.split(", ")[0]
            value = err.get("input")
            if kind not in ("missing", "value_error") and not _secret(path) and isinstance(value, str | int | float):
                msg += f", got {_show(value)}"
        # (the union's path, whether this complaint is only "not this member's type")
        union = (branch[0], branch[2] and _is_type_error(kind)) if branch else None
        entries.append((".".join(path) or "(top level)", msg, union))
    # A union (`sizes: name | table`) reports each member's complaint. Where one member got further than
    # "wrong type", keep only that one's; where none did, the first complaint is enough.
    deeper = {union[0] for *_, union in entries if union and not union[1]}
    lines, seen = [], set()
    for where, msg, union in entries:
        if union and union[1]:
            if union[0] in deeper or union[0] in seen:
                continue
            seen.add(union[0])
        lines.append(f"{where}: {msg}")
    return lines


def _is_type_error(kind: str) -> bool:
    return kind.endswith("_type") or kind.endswith("_parsing") or kind == "literal_error"


# ---- checks across sections -------------------------------------------------------------------------


def _check_providers(config: Config) -> list[str]:
    """Each provider's kind is known, and its options are the ones that kind reads, with their types."""
    from .providers import KINDS, options_model, provider_class

    problems = []
    for name, pc in config.providers.items():
        if pc.kind not in KINDS:
            hint = suggest(pc.kind, KINDS) or f"; known kinds: {', '.join(sorted(KINDS))}"
            problems.append(f"providers.{name}.kind: unknown provider kind '{pc.kind}'{hint}")
            continue
        model = options_model(provider_class(pc.kind))
        try:
            options = model.model_validate(pc.options)
        except ValidationError as e:
            problems += validation_problems(model, e, ("providers", name), extra_known=("kind",))
            continue
        # The typed values: "300" from a ${VAR} becomes 300.0 where the option is a number.
        config.providers[name] = ProviderConfig(kind=pc.kind, **options.model_dump(exclude_unset=True))
    return problems


def _check_references(config: Config) -> list[str]:
    problems = []
    for name, model in config.models.items():
        for i, route in enumerate(model.routes):
            if route.provider not in config.providers:
                problems.append(f"models.{name}.routes.{i}: provider '{route.provider}' is not defined under "
                                f"providers{suggest(route.provider, config.providers)}")
        if isinstance(model.sizes, str) and model.sizes not in config.size_tables:
            problems.append(f"models.{name}.sizes: size table '{model.sizes}' is not defined under "
                            f"size_tables{suggest(model.sizes, config.size_tables)}")
    default = config.server.default_model
    if default is not None and default not in config.models:
        known = ", ".join(config.models) or "none"
        problems.append(f"server.default_model: '{default}' is not a configured model"
                        f"{suggest(default, config.models) or f' (models: {known})'}")
    tables = [(f"size_tables.{name}", table) for name, table in config.size_tables.items()]
    tables += [(f"models.{name}.sizes", m.sizes) for name, m in config.models.items()
               if isinstance(m.sizes, SizeTableConfig)]
    for where, table in tables:
        try:
            table.build()
        except ValueError as e:
            problems.append(f"{where}: {e}")
    return problems


def expand_env(value: Any, env: dict[str, str], missing: set[str]) -> Any:
    """Expand ${VAR} / ${VAR:-default} in every string of a parsed YAML tree."""
    if isinstance(value, str):

        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if env.get(name):
                return env[name]
            if default is None:
                missing.add(name)
            return default or ""

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [expand_env(v, env, missing) for v in value]
    if isinstance(value, dict):
        return {k: expand_env(v, env, missing) for k, v in value.items()}
    return value


def parse_config(data: Any, env: dict[str, str] | None = None, source: str = "config") -> Config:
    """A parsed YAML tree -> Config; ConfigError lists every problem, one `source: path: message` line each."""
    env = dict(os.environ) if env is None else env
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    missing_vars: dict[str, list[str]] = {}
    expanded: dict[str, Any] = {}
    for key, value in data.items():
        if key == "providers" and isinstance(value, dict):
            expanded[key] = {}
            for pname, pvalue in value.items():
                missing: set[str] = set()
                expanded[key][pname] = expand_env(pvalue, env, missing)
                if missing:
                    missing_vars[pname] = sorted(missing)
        else:
            expanded[key] = expand_env(value, env, set())
    try:
        config = Config.model_validate(expanded, context={"env": env})  # key_env and metrics_key_env read env
    except ValidationError as e:
        problems = validation_problems(Config, e)
    else:
        problems = _check_providers(config) + _check_references(config)
    if problems:
        raise ConfigError("\n".join(f"{source}: {line}" for line in problems))
    config.missing_vars = missing_vars
    return config


def load_config(path: str | os.PathLike, env: dict[str, str] | None = None) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not valid YAML: it is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(e)}") from None
    return parse_config(data, env, source=str(path))


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: what and where."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem
