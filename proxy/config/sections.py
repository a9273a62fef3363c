"""The smaller top-level sections: store, state, fetch, routing, passthrough and telemetry."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from .strict import Strict

_S3_ONLY = ("bucket", "endpoint_url", "region", "prefix", "access_key_id_env", "secret_access_key_env",
            "presign", "public_url", "serve_via_proxy", "timeout")
# A bucket name: S3's rules, and the older, laxer names some servers still keep (upper case, '_').
_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")
# SigV4 presigned links live at most 7 days (S3 refuses a longer X-Amz-Expires).
MAX_PRESIGN_SECONDS = 7 * 24 * 3600
# The standard variables the bucket client (obstore) takes secrets from when the store names none (AWS_TOKEN
# is obstore's other name for the session token). AWS_ACCESS_KEY_ID is no secret: every presigned link shows it.
AWS_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_TOKEN", "AWS_SSE_CUSTOMER_KEY_BASE64")


def http_url(value: str | None, example: str = "https://api.openai.com/v1") -> str | None:
    """An http(s) URL with a host, or None for empty. Without a scheme, every call to it would fail later
    (an invalid URL), far from the line that caused it."""
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL with a host, e.g. {example}")
    if has_credentials(value):
        raise ValueError(CREDENTIALS_IN_URL)
    return value


# The message names no part of the URL: the password is in it.
CREDENTIALS_IN_URL = "must not hold credentials (user:password@host); give the key in api_key instead"


def has_credentials(url: str) -> bool:
    """Whether an URL carries userinfo (user:password@ before the host)."""
    return "@" in urlsplit(url).netloc


class StoreConfig(Strict):
    """Where images behind response_format=url live: a folder (filesystem) or an S3-compatible bucket."""

    kind: Literal["filesystem", "s3"] = "filesystem"
    path: str = "var/images"
    ttl_seconds: float = Field(default=3600, gt=0)
    # Upstream URLs expire and reveal the provider: download and serve them ourselves by default.
    rehost_upstream_urls: bool = True
    max_download_mb: float = Field(default=64, gt=0)
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

    @field_validator("endpoint_url", "public_url")
    @classmethod
    def _bucket_url(cls, value: str | None) -> str | None:
        # Without a scheme ("minio:9000") every call to the bucket failed (a panic's stack trace on stderr
        # and a 503 per request) though check-config passed; user:password@ went out in every url answer.
        if value and has_credentials(value):
            raise ValueError("must not hold credentials (user:password@host): the bucket's keys go in the "
                             "variables access_key_id_env / secret_access_key_env name")
        return http_url(value, "https://minio.example.com:9000")

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str | None) -> str | None:
        # S3's names (and the older, laxer ones some servers keep): "a b" made every upload panic in the
        # client, "b?x" signed links whose query held the key.
        if value and (not _BUCKET.fullmatch(value) or value in (".", "..")):
            raise ValueError(f"{value[:70]!r} is not a bucket name: 1 to 255 letters, digits, '.', '-' or '_' "
                             "(e.g. my-images)")
        return value

    @field_validator("prefix")
    @classmethod
    def _object_prefix(cls, value: str) -> str:
        # A key prefix the bucket client cannot parse would stop `serve` at start with a traceback (and
        # pass check-config): "a//b", "." or ".." segments, control characters. Leading "/" are dropped,
        # one trailing "/" is allowed.
        path = value.lstrip("/")
        path = path[:-1] if path.endswith("/") else path
        if path and any(part in ("", ".", "..") or any(ord(c) < 32 or ord(c) == 127 for c in part)
                        for part in path.split("/")):
            raise ValueError(f"{value!r} is not a usable key prefix: path segments separated by single '/', "
                             "none of them empty, '.' or '..', no control characters (e.g. 'qip/')")
        return value

    @property
    def link_ttl(self) -> float:
        """Seconds a url answer's links work: ttl_seconds, but a presigned link at most 7 days."""
        if self.kind == "s3" and self.presign and not self.serve_via_proxy:
            return min(self.ttl_seconds, MAX_PRESIGN_SECONDS)
        return self.ttl_seconds

    def link_warning(self) -> str | None:
        """A line for check-config and serve when images outlive the links to them."""
        if self.link_ttl >= self.ttl_seconds:
            return None
        return (f"store.ttl_seconds is {self.ttl_seconds:.0f}, but presigned links live at most {MAX_PRESIGN_SECONDS} s "
                "(7 days, S3's limit): url answers' links expire before their images, and an Idempotency-Key "
                "repeat of a url request is replayed for 7 days at most; set serve_via_proxy: true for links "
                f"that last as long as the images, or ttl_seconds: {MAX_PRESIGN_SECONDS}")

    def secrets(self, env: Mapping[str, str] | None = None) -> list[str]:
        """A bucket's secrets: the variable secret_access_key_env names, and the standard AWS_* ones the client
        falls back to (none for kind: filesystem). Not the access key id: every presigned link shows it, and a
        dummy one ("test", "minioadmin") would be cut out of every log line and revised prompt."""
        if self.kind != "s3":
            return []
        source = os.environ if env is None else env
        names = [n for n in (self.secret_access_key_env,) if n] + list(AWS_SECRET_VARIABLES)
        return [value for name in names if (value := source.get(name))]

    @model_validator(mode="after")
    def _kind_options(self) -> StoreConfig:
        if self.kind == "s3" and not self.bucket:
            raise ValueError("kind: s3 needs a bucket")
        if self.kind == "filesystem":
            given = [k for k in _S3_ONLY if k in self.model_fields_set]
            if given:
                raise ValueError(f"{given[0]} is an option of kind: s3 (this store is kind: filesystem)")
        return self


class StateConfig(Strict):
    """Idempotency records and shared counters: in this process's memory, or in Redis (shared by every
    process and machine that uses the same redis_url)."""

    # redis://[user:password@]host:port/db, rediss:// for TLS; empty: in memory.
    redis_url: str | None = None
    # redis_url is one node of a Redis Cluster (ElastiCache / Memorystore cluster mode, a self-hosted
    # cluster): the client finds the others and follows MOVED; the keys of one step share a hash tag.
    redis_cluster: bool = False
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

    @model_validator(mode="after")
    def _cluster(self) -> StateConfig:
        if not self.redis_cluster:
            return self
        if not self.redis_url:
            raise ValueError("redis_cluster: true needs state.redis_url (one node of the cluster)")
        parts = urlsplit(self.redis_url)
        if parts.scheme == "unix":
            raise ValueError("redis_cluster: a Redis Cluster is reached over TCP (redis:// or rediss://), "
                             "not a unix socket")
        if parts.path.strip("/") not in ("", "0"):
            raise ValueError("redis_cluster: a Redis Cluster has only database 0; end redis_url with /0 or "
                             "no database")
        # The proxy puts its own hash tag ({...}) into each key after the prefix: a brace in the prefix
        # would end up in the tag, and one request's keys could land in different slots.
        if "{" in self.key_prefix or "}" in self.key_prefix:
            raise ValueError("key_prefix: with redis_cluster the prefix may not hold { or } (the proxy "
                             "adds the hash tags itself)")
        return self


class FetchConfig(Strict):
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

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, networks: list[str]) -> list[str]:
        for text in networks:
            try:
                ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ValueError(f"'{text}' is not a network like '10.1.0.0/16' or 'fd00::/8'") from None
        return networks


class RoutingConfig(Strict):
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


class PassthroughConfig(Strict):
    base_url: str | None = None
    api_key: str | None = None
    timeout: float = Field(default=600, gt=0)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return http_url(value)

    @property
    def enabled(self) -> bool:
        return bool(self.base_url)


class TelemetryConfig(Strict):
    """OpenTelemetry traces (pip install '.[otel]'). Off unless otlp_endpoint (or the standard
    OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT variable) is set; each key left
    unset falls back to its standard OTEL_* variable."""

    # Base URL of the collector, e.g. http://localhost:4318 (http/protobuf: /v1/traces is added) or
    # http://localhost:4317 (grpc).
    otlp_endpoint: str | None = None
    protocol: Literal["http/protobuf", "grpc"] | None = None
    # The share of requests traced (a client's sampled traceparent is always followed): 0 to 1.
    sample_ratio: float | None = Field(default=None, ge=0, le=1)
    service_name: str | None = None
    # The variable holding the exporter's headers, "name=value,name2=value2" (a collector's token).
    headers_env: str | None = None
    # Prompts as span attributes (qip.prompt): off, since prompts may be personal data.
    record_prompts: bool = False

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return http_url(value, "http://localhost:4318")
