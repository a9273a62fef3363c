"""The jobs' pure parts: Standard Webhooks signatures (checked by the reference `standardwebhooks`
package), the retry schedule, answer outcomes, the background ask, and the stored request's round trip."""

from __future__ import annotations

import base64
import time

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from proxy.config import ConfigError, parse_config
from proxy.errors import InvalidRequest
from proxy.jobs.ask import prefers_async, take_background
from proxy.jobs.model import Job, new_job_id, request_from_bytes, request_to_bytes, strip_b64, webhook_body
from proxy.jobs.webhooks import backoff, headers, outcome, sign
from proxy.request import ImageRequest, InputImage, LoraRef

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()


def test_signatures_verify_with_the_reference_package():
    body = '{"type":"image.job.completed","data":{"id":"imgjob_1"}}'
    now = int(time.time())
    sent = headers(SECRET, "msg_1", now, body)
    assert sent["webhook-signature"].startswith("v1,")
    assert Webhook(SECRET).verify(body, sent)["data"]["id"] == "imgjob_1"
    with pytest.raises(WebhookVerificationError):  # another body
        Webhook(SECRET).verify(body.replace("1", "2"), sent)
    other = "whsec_" + base64.b64encode(bytes(32)).decode()
    with pytest.raises(WebhookVerificationError):  # another secret
        Webhook(other).verify(body, sent)
    assert sign(SECRET, "msg_1", now, body) != sign(SECRET, "msg_2", now, body)


def test_backoff_grows_is_jittered_and_capped():
    assert backoff(1, 5, 3600, rand=0) == 2.5 and backoff(1, 5, 3600, rand=1) == 5
    assert backoff(4, 5, 3600, rand=1) == 40
    assert backoff(30, 5, 3600, rand=1) == 3600 and backoff(30, 5, 3600, rand=0) == 1800
    assert len({backoff(3, 5, 3600) for _ in range(20)}) > 1


@pytest.mark.parametrize(("status", "expected"), [
    (200, "delivered"), (204, "delivered"), (410, "gone"), (429, "retry"), (500, "retry"), (503, "retry"),
    (None, "retry"), (400, "failed"), (404, "failed"), (301, "failed"),
])
def test_outcomes(status, expected):
    assert outcome(status) == expected


def test_the_background_ask():
    fields = {"prompt": "x", "background": True, "webhook_url": "https://h.example/x"}
    ask = take_background(fields, None)
    assert ask.webhook_url == "https://h.example/x" and fields == {"prompt": "x"}
    assert take_background({"background": "true"}, None) is not None  # a multipart field
    fields = {"background": "transparent"}
    assert take_background(fields, None) is None and fields == {"background": "transparent"}
    fields = {"background": False}
    assert take_background(fields, None) is None and fields == {}
    ask = take_background({}, "handling=lenient, respond-async; wait=5")
    assert ask is not None and ask.prefer_header
    assert prefers_async("RESPOND-ASYNC") and not prefers_async("respond-asynchronously") and not prefers_async(None)
    with pytest.raises(InvalidRequest):
        take_background({"webhook_url": "https://h.example/x"}, None)
    with pytest.raises(InvalidRequest):
        take_background({"background": True, "webhook_url": ["x"]}, None)


def test_a_stored_request_comes_back_the_same():
    img = InputImage(b"\x89PNG fake", "png", 3, 2)
    req = ImageRequest(prompt="p", model="m", width=64, height=48, seed=7, n=2, images=(img,), mask=img,
                       loras=(LoraRef(path="a.safetensors", scale=0.5),), extra={"x": [1, {"y": 2}]})
    assert request_from_bytes(request_to_bytes(req)) == req


def test_webhook_body_has_no_image_bytes():
    job = Job(id=new_job_id(), owner="o", key_name=None, model="m", kind="generation", request={},
              status="completed")
    result = {"created": 1, "data": [{"b64_json": "QUJD" * 1000, "revised_prompt": "p"}]}
    body = webhook_body(job, "image.job.completed", result, time.time())
    assert "QUJD" not in body and '"revised_prompt":"p"' in body
    assert strip_b64(None) is None


@pytest.mark.parametrize("secret", ["abc", "whsec_not base64!", "whsec_" + base64.b64encode(b"short").decode()])
def test_bad_webhook_secrets_are_config_errors(secret):
    with pytest.raises(ConfigError) as e:
        parse_config({"jobs": {"webhook_secret": secret}}, env={})
    assert "jobs.webhook_secret" in str(e.value) and secret not in str(e.value)


def test_key_webhooks_must_name_a_key():
    cfg = {"server": {"api_keys": [{"name": "mobile-app", "key": "k"}]},
           "jobs": {"key_webhooks": {"mobile-ap": {"url": "https://h.example/x"}}}}
    with pytest.raises(ConfigError) as e:
        parse_config(cfg, env={})
    assert "jobs.key_webhooks.mobile-ap" in str(e.value) and "did you mean 'mobile-app'" in str(e.value)
    cfg["jobs"]["key_webhooks"] = {"mobile-app": {"url": "ftp://h.example/x"}}
    with pytest.raises(ConfigError):
        parse_config(cfg, env={})
