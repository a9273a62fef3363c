"""The S3 image store's settings and credentials, with no live bucket: what the config accepts and refuses,
what check-config warns of, and the bucket's keys as secrets that no log line or answer carries (a
stand-in bucket where one must answer). The store against moto's S3 server is in test_s3_store.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from openai import APIStatusError

from proxy.config import ConfigError, parse_config
from proxy.state.factory import make_store
from proxy.state.store import StoreUnavailable
from proxy.state.store_s3 import S3Store

from .conftest import base_config
from .services import S3_KEY_ID, S3_SECRET

ROOT = Path(__file__).resolve().parent.parent


# ---- what the config accepts --------------------------------------------------------------------------


def test_a_prefix_the_bucket_client_cannot_use_is_a_config_error():
    # It passed check-config, then stopped `serve` at start with a traceback from the bucket client.
    for prefix in ("a//b/", "qip/../x", "./qip", "qip\n"):
        with pytest.raises(ConfigError, match="store.prefix"):
            parse_config({"store": {"kind": "s3", "bucket": "b", "prefix": prefix}}, env={})
    for prefix in ("qip", "qip/", "/qip/", "a/b/", "my images/", ""):
        assert parse_config({"store": {"kind": "s3", "bucket": "b", "prefix": prefix}}, env={}).store.prefix == prefix


def test_bucket_urls_and_names_the_client_cannot_use_are_config_errors():
    """endpoint_url: minio:9000 (no scheme) passed check-config; then every url request was a 503 and the
    bucket client printed a panic's stack trace. A user:password@ in endpoint_url or public_url went out
    in every link; a bucket named "a b" panicked the same way, "b?x" signed links with the key in the query."""
    def problem(**store) -> str:
        with pytest.raises(ConfigError) as info:
            parse_config({"store": {"kind": "s3", "bucket": "b", **store}}, env={})
        return str(info.value)

    for url in ("minio:9000", "127.0.0.1:9000", "ftp://minio:9000", "not a url"):
        assert "store.endpoint_url: must be an http:// or https:// URL" in problem(endpoint_url=url)
        assert "store.public_url: must be an http:// or https:// URL" in problem(presign=False, public_url=url)
    for key in ("endpoint_url", "public_url"):
        text = problem(**{key: "https://admin:hunter2-pw@minio.example.com"})
        assert f"store.{key}: must not hold credentials" in text and "hunter2-pw" not in text
    for name in ("a b", "b?x", "b/x", "..", "b\nx", "x" * 256):
        assert "store.bucket:" in problem(bucket=name)
    for url in ("http://127.0.0.1:9000", "https://s3.eu-central-1.amazonaws.com/", "http://[::1]:9000"):
        store = parse_config({"store": {"kind": "s3", "bucket": "my.images_Old-1", "endpoint_url": url,
                                        "public_url": url}}, env={}).store
        assert store.endpoint_url == url and store.bucket == "my.images_Old-1"


def test_config_builds_the_store_and_reads_keys_from_the_named_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("MY_S3_KEY", "AKIAFROMENV")
    monkeypatch.setenv("MY_S3_SECRET", "secret-from-env")
    cfg = parse_config({"store": {"kind": "s3", "bucket": "b", "endpoint_url": "http://127.0.0.1:9",
                                  "access_key_id_env": "MY_S3_KEY", "secret_access_key_env": "MY_S3_SECRET",
                                  "prefix": "p/", "ttl_seconds": 120, "serve_via_proxy": True}}, env={})
    store = make_store(cfg.store)
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.ttl, store.serve_via_proxy) == ("b", "p/", 120, True)
    assert store._access_key_id == "AKIAFROMENV" and store._secret_access_key == "secret-from-env"


def test_check_config_warns_when_images_outlive_their_presigned_links(tmp_path):
    cfg = base_config(tmp_path)
    cfg["store"] = {"kind": "s3", "bucket": "b", "ttl_seconds": 30 * 86400}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "proxy", "check-config", "--strict", "--config", str(path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr  # links that expire early still work: a warning, not an error
    assert "warning: store.ttl_seconds is 2592000, but presigned links live at most 604800 s" in out.stdout
    assert "serve_via_proxy: true" in out.stdout
    for fine in ({"ttl_seconds": 604800}, {"ttl_seconds": 30 * 86400, "serve_via_proxy": True},
                 {"ttl_seconds": 30 * 86400, "presign": False}):
        cfg["store"] = {"kind": "s3", "bucket": "b", **fine}
        assert parse_config(cfg, env={}).store.link_warning() is None


# ---- the bucket's credentials are secrets ---------------------------------------------------------------


AWS_KEY_ID, AWS_SECRET, AWS_TOKEN = "AKIAFROMTHEENVIRONMENT", "aws-env-secret-0000000000", "aws-env-session-token-000000"


def aws_variables(monkeypatch) -> None:
    """Credentials in the standard variables only, as on a machine with an assumed role's keys."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", AWS_TOKEN)


async def test_credentials_from_the_aws_variables_never_reach_logs_or_answers(aiohttp_server, start_proxy, tmp_path,
                                                                               monkeypatch, caplog):
    """Keys from AWS_* (obstore's fallback when the config names none) were not secrets to the store or the
    log scrubber: a bucket's error that quotes them (S3's ExpiredToken and InvalidToken carry the session
    token) put them into the log line, where the named variables' values were taken out."""
    aws_variables(monkeypatch)

    async def expired(request: web.Request) -> web.Response:  # a terse server: the whole answer on one line
        token = request.headers.get("x-amz-security-token", "")
        body = f"<Error><Code>ExpiredToken</Code><Token-0>{token}</Token-0></Error>"
        return web.Response(status=400, text=body, content_type="application/xml")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", expired)
    bucket = await aiohttp_server(app)
    cfg = base_config(tmp_path)
    cfg["store"] = {"kind": "s3", "bucket": "qip-echo", "endpoint_url": str(bucket.make_url("")).rstrip("/"),
                    "timeout": 2}
    _, client = await start_proxy(cfg)
    with pytest.raises(APIStatusError) as info:
        await client.images.generate(model="qwen-image-placeholder", prompt="a fox", size="64x64",
                                     response_format="url")
    assert info.value.status_code == 503 and info.value.code == "store_unavailable"
    assert "ExpiredToken" in caplog.text and "[redacted]" in caplog.text  # the log still says why
    for text in (caplog.text, info.value.response.text):
        for secret in (AWS_KEY_ID, AWS_SECRET, AWS_TOKEN):
            assert secret not in text


def test_a_secret_the_log_line_cuts_through_is_still_taken_out(caplog):
    """The log keeps 300 characters of the bucket's error; they were cut first and redacted after, so a
    secret across the cut (an echoed key, as above) left its first part in the log."""
    store = S3Store("qip-cut", ttl_seconds=60, endpoint_url="http://127.0.0.1:9",
                    access_key_id=S3_KEY_ID, secret_access_key=S3_SECRET)
    error = store._unavailable("save images to", OSError("<Error>" + "." * 273 + S3_SECRET + "</Error>"))
    assert isinstance(error, StoreUnavailable)
    assert "....[redacted]" in caplog.text and S3_SECRET[:12] not in caplog.text


def test_the_buckets_credentials_are_secrets_like_the_others(monkeypatch, tmp_path):
    """config.secrets() (what every log record and error answer is scrubbed of) held no store credential."""
    aws_variables(monkeypatch)
    monkeypatch.setenv("QIP_TEST_S3_SECRET", "named-variable-secret-00")
    cfg = base_config(tmp_path)
    cfg["store"] = {"kind": "s3", "bucket": "b", "secret_access_key_env": "QIP_TEST_S3_SECRET"}
    found = parse_config(cfg, env={}).secrets()
    assert {"named-variable-secret-00", AWS_SECRET, AWS_TOKEN} <= set(found)
    assert AWS_KEY_ID not in found  # in every presigned link (the store's own log line leaves it out)
    assert AWS_SECRET not in parse_config(base_config(tmp_path), env={}).secrets()  # a folder reads no AWS_*
