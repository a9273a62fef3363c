"""Robustness of the local route through the proxy: a bad prompt is the client's 400 and fails no
other request; a loading model is loading (loading_stage / wait_ready), not an outage."""

from __future__ import annotations

import asyncio
import json
import logging
import threading

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from openai import BadRequestError  # noqa: E402
from openai.types import ImagesResponse  # noqa: E402

from local_backend import EngineError, GenerationParams  # noqa: E402
from proxy.providers.base import ProviderContext  # noqa: E402
from proxy.providers.local import LocalProvider  # noqa: E402

from .test_local_e2e import (  # noqa: E402
    MODEL,
    PROVIDER,
    Gate,
    decode,
    generate,
    local_config,
    metric,
    provider_of,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FALLBACK_MODEL = "tiny-fb"  # local first, then the placeholder: an open breaker would show


async def bad_request(client, prompt: str, model: str = FALLBACK_MODEL):
    """What a JavaScript client sends for a string with a lone surrogate: the JSON escape "\\ud800".

    The openai package itself cannot send it (it encodes JSON as strict UTF-8), so the body is
    serialized here (json.dumps escapes non-ASCII) and posted with the same client.
    """
    body = {"model": model, "prompt": prompt, "response_format": "b64_json", "seed": 1}
    return await client.post(
        "/images/generations", cast_to=ImagesResponse, content=json.dumps(body).encode("ascii"),
        options={"headers": {"Content-Type": "application/json"}},
    )


async def test_bad_prompt_in_a_burst_fails_only_itself(start_proxy, tmp_path, tiny_dir, caplog):
    models = {
        MODEL: {"sizes": "tiny", "routes": [PROVIDER]},
        FALLBACK_MODEL: {"sizes": "tiny", "routes": [PROVIDER, "placeholder"]},
    }
    server, client = await start_proxy(local_config(tmp_path, tiny_dir, models, max_batch=4))
    provider = provider_of(server)
    gate = Gate(provider)
    good = [("a cat", 21, "64x64"), ("a dog on a sofa", 22, "64x64"), ("a cat", 23, "64x64")]
    with caplog.at_level(logging.INFO):
        try:
            running = await gate.hold(generate(client, "the job in the way", seed=20))
            tasks = [asyncio.ensure_future(generate(client, p, seed=s, size=size, model=FALLBACK_MODEL))
                     for p, s, size in good]
            bad = asyncio.ensure_future(bad_request(client, "a fox \ud800 in the snow"))

            async def burst_arrived() -> bool:
                return bad.done() and provider.engine.queue_depth == len(good)

            await wait_until(burst_arrived)  # the good ones wait to share a call; the bad one is out
        finally:
            gate.open()
        with pytest.raises(BadRequestError) as e:
            await bad
        assert e.value.status_code == 400 and e.value.body["param"] == "prompt"
        results = [await running] + [await t for t in tasks]
        for (_, seed, _), r in zip(good, results[1:], strict=True):
            im = decode(r.data[0])
            assert (im.format, im.size) == ("PNG", (64, 64)) and r.to_dict()["seeds"] == [seed]

        # Client errors never count against the route: after six of them the breaker (threshold 5)
        # is still closed, so a good request on the two-route model is served locally.
        for _ in range(6):
            with pytest.raises(BadRequestError) as e:
                await bad_request(client, "\ud800")
            assert e.value.status_code == 400 and e.value.body["param"] == "prompt"
        raw = await client.images.with_raw_response.generate(
            model=FALLBACK_MODEL, prompt="after the bad ones", response_format="b64_json", extra_body={"seed": 5}
        )
    if "x-qip-route" in raw.headers:  # the router names the route that served, when it does
        assert raw.headers["x-qip-route"] == PROVIDER
    assert decode(raw.parse().data[0]).size == (64, 64)
    assert await metric(server, "qip_images_total", model=FALLBACK_MODEL, route=PROVIDER) == len(good) + 1
    assert await metric(server, "qip_images_total", model=FALLBACK_MODEL, route="placeholder") == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]  # nothing in the burst was the server's fault


async def test_a_prompt_the_tokenizer_rejects_is_a_400_and_fails_no_one_else(
    start_proxy, tmp_path, tiny_dir, monkeypatch, caplog
):
    """Text the proxy lets through but the model's tokenizer rejects (injected here: the tiny
    tokenizer takes anything but lone surrogates, which the proxy refuses itself) breaks the batched
    call; the engine runs each job alone, and the culprit's error is the client's: 400, param prompt."""
    server, client = await start_proxy(local_config(tmp_path, tiny_dir, max_batch=4))
    provider = provider_of(server)
    marker = "the prompt the tokenizer rejects"
    tokenizer = provider.engine.pipe.tokenizer

    class Picky(type(tokenizer)):
        def __call__(self, text=None, *args, **kwargs):
            texts = [text] if isinstance(text, str) else list(text or [])
            if any(marker in t for t in texts):
                raise ValueError("text input must be of type `str`")
            return super().__call__(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "__class__", Picky)
    gate = Gate(provider)
    with caplog.at_level(logging.INFO):
        try:
            running = await gate.hold(generate(client, "the job in the way", seed=20))
            tasks = [asyncio.ensure_future(generate(client, p, seed=s))
                     for p, s in [("a cat", 1), (marker, 2), ("a dog", 3), ("a cat", 4)]]

            async def all_queued() -> bool:
                return provider.engine.queue_depth == len(tasks)

            await wait_until(all_queued)
        finally:
            gate.open()
        await running
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    culprit = outcomes.pop(1)
    assert isinstance(culprit, BadRequestError), culprit
    assert culprit.body["param"] == "prompt" and "tokenizer" in culprit.body["message"]
    for r in outcomes:
        assert decode(r.data[0]).size == (64, 64)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


async def test_provider_maps_bad_text_to_invalid_request(start_proxy, tmp_path, tiny_dir):
    """Whatever the proxy's parser lets through, the local provider itself answers bad text with
    InvalidRequest (400, not retried, not counted by a breaker)."""
    from proxy.config import RouteConfig
    from proxy.errors import InvalidRequest
    from proxy.request import ImageRequest

    server, _ = await start_proxy(local_config(tmp_path, tiny_dir))
    provider = provider_of(server)
    route = RouteConfig(provider=PROVIDER)
    for field in ("prompt", "negative_prompt"):
        values = {"prompt": "a fox", field: "a \ud800 fox"}
        with pytest.raises(InvalidRequest) as e:
            await provider.generate(ImageRequest(model=MODEL, width=64, height=64, seed=1, **values), route)
        assert e.value.param == field and not e.value.retryable
        assert "surrogate" in e.value.message


# ---- loading is a state, not an outage --------------------------------------------------------------


class SlowLoad:
    """Wraps the engine's load_pipeline: it reports a stage, then waits until released."""

    def __init__(self, monkeypatch, fail: str | None = None):
        from local_backend import engine as engine_module

        self.entered, self.release = threading.Event(), threading.Event()
        real = engine_module.load_pipeline

        def load_pipeline(config, progress=None):
            progress("reading the text encoder")
            self.entered.set()
            assert self.release.wait(30)
            if fail:
                raise EngineError(fail)
            return real(config, progress)

        monkeypatch.setattr(engine_module, "load_pipeline", load_pipeline)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 30)


def provider_for(tiny_dir) -> LocalProvider:
    return LocalProvider(PROVIDER, {"model": str(tiny_dir), "device": "cpu", "default_steps": 2})


async def test_loading_stage_and_wait_ready(tiny_dir, monkeypatch):
    slow = SlowLoad(monkeypatch)
    provider = provider_for(tiny_dir)
    assert provider.loading_stage is None  # not started yet
    await provider.start(ProviderContext(http=None))  # loads in the background by default
    try:
        await slow.wait_entered()
        stage = provider.loading_stage
        assert stage is not None and stage.startswith("loading the model: reading the text encoder (")
        assert stage.endswith(" s so far)")
        assert provider.unavailable_reason.startswith("loading the model")  # still unavailable
        assert await provider.wait_ready(0.05) is False  # timed out: not ready, and the load goes on

        # A waiter that is cancelled (its client hung up) must not cancel the load.
        waiter = asyncio.ensure_future(provider.wait_ready(30))
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert provider.loading_stage is not None

        waiters = [asyncio.ensure_future(provider.wait_ready(30)) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in waiters)
        slow.release.set()
        assert await asyncio.gather(*waiters) == [True, True, True]
        assert provider.loading_stage is None and provider.unavailable_reason is None
        assert await provider.wait_ready(0) is True
        result = await provider.engine.generate(GenerationParams("a fox", width=32, height=32, seed=1))
        assert result.images[0].size == (32, 32)
    finally:
        slow.release.set()
        await provider.close()


async def test_failed_load_is_unavailable_not_loading(tiny_dir, monkeypatch):
    slow = SlowLoad(monkeypatch, fail="the disk went away")
    provider = provider_for(tiny_dir)
    await provider.start(ProviderContext(http=None))
    try:
        await slow.wait_entered()
        waiter = asyncio.ensure_future(provider.wait_ready(30))
        slow.release.set()
        assert await waiter is False  # returns when the load ends, ready or not
        assert provider.loading_stage is None
        assert provider.unavailable_reason == f"failed to load {tiny_dir}: EngineError: the disk went away"
        assert await provider.wait_ready(5) is False  # at once
    finally:
        await provider.close()


async def test_close_while_loading(tiny_dir, monkeypatch):
    slow = SlowLoad(monkeypatch)
    provider = provider_for(tiny_dir)
    await provider.start(ProviderContext(http=None))
    await slow.wait_entered()
    engines_before = {t for t in threading.enumerate() if t.name == "qwen-image-engine"}
    waiter = asyncio.ensure_future(provider.wait_ready(30))
    await asyncio.wait_for(provider.close(), 30)  # does not wait for the load to finish
    assert await asyncio.wait_for(waiter, 30) is False
    assert provider.loading_stage is None and provider.unavailable_reason == "closed"
    slow.release.set()  # the load finishes in its thread and drops what it made

    async def no_new_worker() -> bool:
        now = {t for t in threading.enumerate() if t.name == "qwen-image-engine"}
        return now <= engines_before

    await asyncio.sleep(0.5)
    await wait_until(no_new_worker, timeout=10)
    assert provider.engine is None
