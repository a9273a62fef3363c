"""Idempotency-Key on image calls, with the in-memory records: a repeat gets the first answer without a
second generation, concurrent repeats wait for the first, another body under the same key is a 422, and
a first attempt that failed is not kept."""

from __future__ import annotations

import asyncio
import io
import time
from types import SimpleNamespace

import aiohttp
import pytest
from PIL import Image

from proxy.errors import UpstreamError
from proxy.providers.placeholder import PlaceholderProvider
from proxy.request import ImageRequest, InputImage
from proxy.state.idempotency import Idempotency, IdempotencyKeyMismatch, fingerprint
from proxy.state.shared import Answer
from proxy.state.shared_memory import MemoryRecords

from .conftest import base_config

MODEL = "qwen-image-placeholder"
BODY = {"model": MODEL, "prompt": "a lighthouse", "size": "64x64", "response_format": "b64_json"}


class CountingPlaceholder(PlaceholderProvider):
    """The placeholder, counting its calls; optionally slow, optionally failing its first calls."""

    def __init__(self, name="placeholder", options=None, missing_vars=None, *, delay=0.0, fail_first=0):
        super().__init__(name, options or {}, missing_vars)
        self.calls = 0
        self.delay = delay
        self.fail_first = fail_first

    async def generate(self, req, route):
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.calls <= self.fail_first:
            raise UpstreamError("the upstream fell over")
        return await super().generate(req, route)


def edit_config(tmp_path, **state) -> dict:
    cfg = base_config(tmp_path)
    cfg["models"][MODEL]["max_input_images"] = 2
    cfg["routing"] = {"retries": 0}
    # A waiter that is never woken fails in seconds, not after the default 600.
    cfg["server"] = {"request_timeout": 10}
    if state:
        cfg["state"] = state
    return cfg


async def start(start_proxy, tmp_path, provider=None, **kwargs):
    provider = provider or CountingPlaceholder()
    cfg = edit_config(tmp_path, **kwargs.pop("state", {}))
    cfg.update(kwargs)
    server, _ = await start_proxy(cfg, providers={"placeholder": provider})
    return server, provider


async def post(server, body=None, key=None, path="/v1/images/generations", auth="Bearer test", data=None):
    headers = {"Authorization": auth} if auth else {}
    if key is not None:
        headers["Idempotency-Key"] = key
    async with aiohttp.ClientSession() as s:
        kwargs = {"data": data} if data is not None else {"json": body if body is not None else BODY}
        async with s.post(server.make_url(path), headers=headers, **kwargs) as r:
            return r.status, dict(r.headers), await r.read()


# ---- over HTTP ----------------------------------------------------------------------------------------


async def test_same_key_and_body_return_the_first_images_without_generating_again(start_proxy, tmp_path):
    server, provider = await start(start_proxy, tmp_path)
    status1, headers1, body1 = await post(server, key="k-1")
    status2, headers2, body2 = await post(server, key="k-1")
    assert status1 == status2 == 200
    assert body2 == body1  # no seed was given: new images would differ
    assert provider.calls == 1
    assert headers2["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in headers1
    assert headers2["x-qip-route"] == headers1["x-qip-route"]
    # Another key, or none: generated again.
    await post(server, key="k-2")
    await post(server)
    assert provider.calls == 3


async def test_url_answers_replay_the_same_links(start_proxy, tmp_path):
    server, provider = await start(start_proxy, tmp_path)
    body = {**BODY, "response_format": "url"}
    _, _, first = await post(server, body, key="url-key")
    _, _, again = await post(server, body, key="url-key")
    assert again == first and provider.calls == 1
    url = __import__("json").loads(first)["data"][0]["url"]
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200
        assert Image.open(io.BytesIO(await r.read())).size == (64, 64)


async def test_concurrent_repeats_wait_for_the_first_and_get_its_answer(start_proxy, tmp_path):
    server, provider = await start(start_proxy, tmp_path, CountingPlaceholder(delay=0.5))
    results = await asyncio.gather(*(post(server, key="busy") for _ in range(5)))
    assert provider.calls == 1
    assert {status for status, _, _ in results} == {200}
    assert len({body for _, _, body in results}) == 1
    assert sorted(h.get("Idempotent-Replayed", "no") for _, h, _ in results) == ["no"] + ["true"] * 4


async def test_the_same_key_with_another_body_is_a_422(start_proxy, tmp_path):
    server, provider = await start(start_proxy, tmp_path, CountingPlaceholder(delay=5))
    first = asyncio.ensure_future(post(server, key="k"))
    await asyncio.sleep(0.1)
    # While the first still runs, and after it: refused at once, in OpenAI's error shape.
    status, _, body = await post(server, {**BODY, "prompt": "another prompt"}, key="k")
    assert not first.done()  # refused while the first is still running, not after it
    assert status == 422
    error = __import__("json").loads(body)["error"]
    assert error["code"] == "idempotency_key_mismatch" and error["type"] == "invalid_request_error"
    assert "different request body" in error["message"]
    assert (await first)[0] == 200
    status, _, _ = await post(server, {**BODY, "size": "128x128"}, key="k")
    assert status == 422
    assert provider.calls == 1


async def test_equivalent_bodies_share_the_key(start_proxy, tmp_path):
    # The fingerprint is of the normalized request: a field that only repeats a default changes nothing.
    server, provider = await start(start_proxy, tmp_path)
    await post(server, BODY, key="norm")
    status, headers, _ = await post(server, {**BODY, "n": 1}, key="norm")
    assert status == 200 and headers.get("Idempotent-Replayed") == "true"
    assert provider.calls == 1


async def test_a_failed_first_attempt_is_not_kept(start_proxy, tmp_path):
    server, provider = await start(start_proxy, tmp_path, CountingPlaceholder(fail_first=1))
    status, _, body = await post(server, key="retry-me")
    assert status == 502 and b"upstream" in body
    status, headers, _ = await post(server, key="retry-me")
    assert status == 200 and "Idempotent-Replayed" not in headers
    assert provider.calls == 2
    status, headers, _ = await post(server, key="retry-me")
    assert status == 200 and headers["Idempotent-Replayed"] == "true" and provider.calls == 2


async def test_waiters_run_again_when_the_first_attempt_fails(start_proxy, tmp_path):
    server, provider = await start(start_proxy, tmp_path, CountingPlaceholder(delay=0.3, fail_first=1))
    results = await asyncio.gather(post(server, key="w"), post(server, key="w"))
    assert sorted(status for status, _, _ in results) == [200, 502]
    assert provider.calls == 2


async def test_keys_belong_to_the_client_that_sent_them(start_proxy, tmp_path):
    server, provider = await start(start_proxy, tmp_path, server={"api_keys": ["key-a", "key-b"], "request_timeout": 10})
    status_a, _, body_a = await post(server, key="shared", auth="Bearer key-a")
    status_b, headers_b, body_b = await post(server, key="shared", auth="Bearer key-b")
    assert status_a == status_b == 200 and "Idempotent-Replayed" not in headers_b
    assert provider.calls == 2 and body_a != body_b


async def test_an_invalid_key_is_a_400(start_proxy, tmp_path):
    server, provider = await start(start_proxy, tmp_path)
    for bad in ("x" * 256, "has space"):
        status, _, body = await post(server, key=bad)
        assert status == 400 and b"invalid_idempotency_key" in body
    assert provider.calls == 0


async def test_answers_over_the_cap_are_not_kept(start_proxy, tmp_path):
    server, provider = await start(start_proxy, tmp_path, state={"idempotency_max_mb": 0.001})
    await post(server, key="big")
    status, headers, _ = await post(server, key="big")
    assert status == 200 and "Idempotent-Replayed" not in headers
    assert provider.calls == 2


def png(colour) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(out, format="PNG")
    return out.getvalue()


def edit_form(image: bytes) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in {"model": MODEL, "prompt": "make it blue", "size": "64x64",
                        "response_format": "b64_json"}.items():
        form.add_field(name, value)
    form.add_field("image", image, filename="in.png", content_type="image/png")
    return form


async def test_edits_are_idempotent_by_their_uploaded_bytes(start_proxy, tmp_path):
    server, provider = await start(start_proxy, tmp_path)
    path = "/v1/images/edits"
    status, _, first = await post(server, key="edit", path=path, data=edit_form(png((200, 0, 0))))
    assert status == 200
    status, headers, again = await post(server, key="edit", path=path, data=edit_form(png((200, 0, 0))))
    assert status == 200 and again == first and headers["Idempotent-Replayed"] == "true"
    # The same fields with another picture is another request.
    status, _, body = await post(server, key="edit", path=path, data=edit_form(png((0, 0, 200))))
    assert status == 422 and b"idempotency_key_mismatch" in body
    assert provider.calls == 1


async def test_the_openai_client_can_send_the_key(start_proxy, tmp_path):
    cfg = edit_config(tmp_path)
    provider = CountingPlaceholder()
    _, client = await start_proxy(cfg, providers={"placeholder": provider})
    kwargs = {"model": MODEL, "prompt": "p", "size": "64x64", "response_format": "b64_json",
              "extra_headers": {"Idempotency-Key": "sdk-1"}}
    first = await client.images.generate(**kwargs)
    again = await client.images.generate(**kwargs)
    assert again.data[0].b64_json == first.data[0].b64_json and provider.calls == 1


# ---- the records and the runner on their own ----------------------------------------------------------


def request_with(key: str | None, auth: str = "Bearer a") -> SimpleNamespace:
    headers = {"Authorization": auth}
    if key is not None:
        headers["Idempotency-Key"] = key
    return SimpleNamespace(headers=headers)


REQ = ImageRequest(prompt="p", model=MODEL, width=64, height=64)


async def test_a_cancelled_first_attempt_frees_the_key():
    idem = Idempotency(MemoryRecords(), ttl=60, wait_timeout=5)
    started = asyncio.Event()

    async def hang():
        started.set()
        await asyncio.sleep(60)

    task = asyncio.ensure_future(idem.run(request_with("c"), REQ, hang))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def ok():
        return Answer(200, b"{}")

    answer, replayed = await asyncio.wait_for(idem.run(request_with("c"), REQ, ok), 30)
    assert answer.body == b"{}" and replayed is False


async def test_a_waiter_gives_up_with_409_at_its_deadline():
    idem = Idempotency(MemoryRecords(), ttl=60, wait_timeout=0.3)
    gate = asyncio.Event()

    async def slow():
        await gate.wait()
        return Answer(200, b"done")

    first = asyncio.ensure_future(idem.run(request_with("d"), REQ, slow))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(Exception) as info:
        await idem.run(request_with("d"), REQ, slow)
    assert info.value.status == 409 and info.value.code == "idempotency_request_in_progress"
    assert 0.2 < time.monotonic() - started < 10  # the first never finishes: only the 0.3 s wait ends it
    assert "Retry-After" in info.value.headers
    gate.set()
    assert (await first)[0].body == b"done"


async def test_mismatch_is_refused_even_against_a_stored_answer():
    idem = Idempotency(MemoryRecords(), ttl=60)

    async def ok():
        return Answer(200, b"x")

    await idem.run(request_with("m"), REQ, ok)
    with pytest.raises(IdempotencyKeyMismatch):
        await idem.run(request_with("m"), ImageRequest(prompt="q", model=MODEL, width=64, height=64), ok)


def test_fingerprint_covers_fields_and_input_bytes():
    a = InputImage(b"one", "png", 1, 1)
    b = InputImage(b"two", "png", 1, 1)
    base = ImageRequest(prompt="p", model=MODEL, images=(a,))
    assert fingerprint(base) == fingerprint(ImageRequest(prompt="p", model=MODEL, images=(a,)))
    assert fingerprint(base) != fingerprint(ImageRequest(prompt="p", model=MODEL, images=(b,)))
    assert fingerprint(base) != fingerprint(ImageRequest(prompt="p", model=MODEL, images=(a,), seed=1))
    assert fingerprint(base) != fingerprint(ImageRequest(prompt="p", model=MODEL, images=(a,), mask=b))
    assert fingerprint(base) != fingerprint(ImageRequest(prompt="p", model=MODEL, images=(a,), extra={"x": 1}))


async def test_memory_records_are_bounded_and_expire():
    records = MemoryRecords(max_records=3, max_bytes=10)
    for i in range(5):
        assert await records.claim(f"k{i}", "fp", "o", ttl=60) is None
        await records.finish(f"k{i}", "fp", "o", Answer(200, b"12"), ttl=60)
    assert list(records._entries) == ["k2", "k3", "k4"]  # least recently used went first
    # By bytes: one answer of 8 bytes pushes out older ones until the total fits in 10.
    records = MemoryRecords(max_records=100, max_bytes=10)
    for i, size in enumerate((4, 4, 8)):
        await records.claim(f"b{i}", "fp", "o", ttl=60)
        await records.finish(f"b{i}", "fp", "o", Answer(200, b"x" * size), ttl=60)
    assert await records.claim("b0", "fp", "p", ttl=60) is None
    assert (await records.claim("b2", "fp", "p", ttl=60)).done
    # By time.
    records = MemoryRecords()
    await records.claim("t", "fp", "o", ttl=60)
    await records.finish("t", "fp", "o", Answer(200, b"x"), ttl=0.05)
    await asyncio.sleep(0.1)
    assert await records.claim("t", "fp", "o2", ttl=60) is None


async def test_only_the_owner_finishes_or_releases_a_claim():
    records = MemoryRecords()
    await records.claim("k", "fp", "owner", ttl=60)
    await records.release("k", "fp", "someone-else")
    await records.finish("k", "fp", "someone-else", Answer(200, b"x"), ttl=60)
    record = await records.claim("k", "fp", "third", ttl=60)
    assert record is not None and not record.done
