"""Prompt enhancement on local routes: the text encoder's rewrite (local_backend.enhance, the engine) and the
chat-completions rewrite (proxy.providers.enhance), through the engine and through the running proxy with the openai
package. The tiny model's random weights write gibberish: what is checked is the path, the bounds and the
plumbing (the image is the one the returned revised_prompt makes with the same seed)."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import threading
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import numpy as np  # noqa: E402
from aiohttp import web  # noqa: E402
from PIL import Image  # noqa: E402

from local_backend import (  # noqa: E402
    DeadlineExceededError,
    Engine,
    EngineConfig,
    EngineError,
    GenerationParams,
    JobCancelledError,
    enhance,
)
from local_backend.config import PromptEnhancement  # noqa: E402
from proxy import parse_config  # noqa: E402
from proxy.providers.enhance import chat_answer, chat_body, parse_options  # noqa: E402

from .local_helpers import noise_image  # noqa: E402
from .test_local_e2e import local_config  # noqa: E402

SIZE = 32
TOKENS = 16
# Nothing like a credential's shape: only the configured secrets can hide it.
SECRET = "zebra-4815162342-lighthouse"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tiny_dir):
    eng = Engine(EngineConfig(model=str(tiny_dir), device="cpu", default_steps=2,
                              prompt_enhancement=PromptEnhancement(max_new_tokens=TOKENS, timeout=30)))
    eng.start()
    yield eng
    eng.close()


def params(prompt="a red fox", **kw) -> GenerationParams:
    kw.setdefault("width", SIZE)
    kw.setdefault("height", SIZE)
    kw.setdefault("seed", 3)
    return GenerationParams(prompt, **kw)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


class SlowTextEncoder:
    """Makes each text-encoder forward pass take `delay` s; `started` is set by the first one (while on)."""

    def __init__(self, pipe, delay: float):
        self.calls, self.started, self.delay, self.on = 0, threading.Event(), delay, True
        self.handle = pipe.text_encoder.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if self.on:
            self.calls += 1
            self.started.set()
            time.sleep(self.delay)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ----- the rewrite itself -----


def test_rewrite_is_bounded_non_empty_and_deterministic(engine):
    first = enhance.rewrite(engine.pipe, "a red fox", max_new_tokens=TOKENS)
    assert first.text and first.text.strip() == first.text and "\n" not in first.text
    assert first.reason in ("done", "max_new_tokens") and 1 <= first.tokens <= TOKENS
    again = enhance.rewrite(engine.pipe, "a red fox", max_new_tokens=TOKENS)
    assert (again.text, again.tokens) == (first.text, first.tokens)  # greedy: the same every time
    short = enhance.rewrite(engine.pipe, "a red fox", max_new_tokens=3)
    assert short.tokens == 3 and short.reason in ("done", "max_new_tokens", "empty")  # 3 random bytes: may clean to ""
    assert enhance.rewrite(engine.pipe, "x" * 5000).reason == "too long"  # 5000 byte tokens > MAX_PROMPT_TOKENS
    assert enhance.rewrite(engine.pipe, "<|im_end|>").reason == "empty"  # special tokens cannot end the turn


def test_time_bound_stops_the_rewrite(engine):
    with SlowTextEncoder(engine.pipe, 0.02):
        started = time.monotonic()
        done = enhance.rewrite(engine.pipe, "a red fox", max_new_tokens=1000, timeout=0.3)  # 1000 tokens: 20 s
        took = time.monotonic() - started
    assert (done.text, done.reason) == (None, "timeout")
    assert took < 10 and done.tokens < 100  # 1000 tokens would take 20 s


def test_clean():
    assert enhance.clean('  Rewritten prompt: "A fox\nin the snow,\tat dawn."\x7f\n') == "A fox in the snow, at dawn."
    assert enhance.clean("<think>plan</think> **Prompt:** a cat") == "a cat"
    assert enhance.clean('He said "hi" and "bye"') == 'He said "hi" and "bye"'  # inner quotes stay
    assert enhance.clean("a fox \ud800 \ufffd") == "a fox ?"
    assert enhance.clean(" \n ") == ""


def test_spec_checks():
    assert enhance.parse_spec({"max_new_tokens": 8}) == PromptEnhancement(max_new_tokens=8)
    for bad in ({"max_new_tokens": 0}, {"timeout": 0}, {"instruction": " "}, {"default": "yes"}, {"nope": 1}):
        with pytest.raises(EngineError):
            enhance.parse_spec(bad)
    assert not enhance.wanted(None, True)  # nothing configured: "on" is a hint that is ignored
    spec = PromptEnhancement(default=True)
    assert enhance.wanted(spec, None) and not enhance.wanted(spec, False)
    assert enhance.instruction_for("edit") == enhance.EDIT_INSTRUCTION
    assert enhance.instruction_for("generate", PromptEnhancement(instruction="mine")) == "mine"


# ----- in the engine -----


def test_engine_job_is_made_from_its_revised_prompt(engine):
    plain = engine.generate_sync(params())
    assert plain.revised_prompt is None  # the config's default is off
    result = engine.generate_sync(params(prompt_enhancement=True))
    revised = result.revised_prompt
    assert revised and revised != "a red fox"
    assert revised == enhance.rewrite(engine.pipe, "a red fox", max_new_tokens=TOKENS).text
    direct = engine.generate_sync(params(revised))
    assert direct.revised_prompt is None
    assert np.array_equal(pixels(result.images[0]), pixels(direct.images[0]))
    assert not np.array_equal(pixels(result.images[0]), pixels(plain.images[0]))


def test_engine_falls_back_to_the_prompt_when_the_rewrite_fails(engine, tiny_dir, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("generation broke")

    engine.pipe.text_encoder.generate = broken  # an instance attribute: the pipeline's encoding is untouched
    try:
        with caplog.at_level(logging.WARNING, logger="local_backend.engine"):
            # A prompt of its own: one rewritten before would be reused without generating.
            result = engine.generate_sync(params("a grey heron", prompt_enhancement=True))
    finally:
        del engine.pipe.text_encoder.generate
    assert result.revised_prompt is None
    assert np.array_equal(pixels(result.images[0]), pixels(engine.generate_sync(params("a grey heron")).images[0]))
    assert "prompt not rewritten (failed: RuntimeError: generation broke" in caplog.text


def test_a_prompt_asked_again_is_not_rewritten_again(engine):
    """Greedy decoding gives the same rewrite for the same prompt: another seed, or the next part of an n
    past max_batch, reuses it instead of running the text encoder's generation again."""
    calls = []
    generate = engine.pipe.text_encoder.generate
    engine.pipe.text_encoder.generate = lambda *a, **kw: calls.append(1) or generate(*a, **kw)
    try:
        first = engine.generate_sync(params("a white stork", prompt_enhancement=True, seed=1))
        again = engine.generate_sync(params("a white stork", prompt_enhancement=True, seed=2))
        other = engine.generate_sync(params("a black stork", prompt_enhancement=True, seed=1))
    finally:
        del engine.pipe.text_encoder.generate
    assert len(calls) == 2  # the white stork once, the black one once
    assert first.revised_prompt and again.revised_prompt == first.revised_prompt
    assert other.revised_prompt  # (the tiny model's random weights may write the same gibberish for both)
    direct = engine.generate_sync(params(first.revised_prompt, seed=2))
    assert np.array_equal(pixels(again.images[0]), pixels(direct.images[0]))


def test_rewrites_keep_the_latest():
    kept = enhance.Rewrites(size=2)
    kept.put(("a", "i", 8), "A")
    kept.put(("b", "i", 8), "B")
    assert kept.get(("a", "i", 8)) == "A"  # now the latest
    kept.put(("c", "i", 8), "C")
    assert kept.get(("b", "i", 8)) is None and kept.get(("a", "i", 8)) == "A" and kept.get(("c", "i", 8)) == "C"
    assert kept.get(("a", "other instruction", 8)) is None and kept.get(("a", "i", 16)) is None


def test_engine_without_enhancement_ignores_the_request(tiny_dir):
    with Engine(EngineConfig(model=str(tiny_dir), device="cpu", default_steps=1)) as eng:
        assert eng.generate_sync(params(prompt_enhancement=True)).revised_prompt is None


def test_edit_engine_rewrites_with_the_edit_instruction(tiny_edit_dir, monkeypatch):
    seen = []
    original = enhance.chat_text
    monkeypatch.setattr(enhance, "chat_text", lambda tok, instr, prompt: seen.append(instr) or original(tok, instr, prompt))
    config = EngineConfig(model=str(tiny_edit_dir), task="edit", device="cpu", default_steps=1,
                          prompt_enhancement={"max_new_tokens": TOKENS})
    with Engine(config) as eng:
        result = eng.generate_sync(params("make it blue", images=[noise_image(SIZE, SIZE)], prompt_enhancement=True))
    assert seen == [enhance.EDIT_INSTRUCTION] and result.revised_prompt and result.images[0].size == (SIZE, SIZE)


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_job_stopped_while_its_prompt_is_rewritten(engine, how):
    transformer_calls = []
    hook = engine.pipe.transformer.register_forward_pre_hook(lambda *a: transformer_calls.append(1))
    with SlowTextEncoder(engine.pipe, 1.0) as slow:  # TOKENS tokens: 16 s
        started = time.monotonic()
        deadline = time.monotonic() + 0.4 if how == "deadline" else None
        job = engine.submit(params(f"an owl ({how})", prompt_enhancement=True, deadline=deadline))
        assert slow.started.wait(10)
        if how == "cancel":
            job.cancel()
        with pytest.raises(JobCancelledError if how == "cancel" else DeadlineExceededError):
            job.future.result(timeout=10)
        took = time.monotonic() - started
    hook.remove()
    assert took < 10 and slow.calls < TOKENS  # the rewrite stopped early
    assert transformer_calls == []  # and nothing was generated
    assert engine.generate_sync(params()).images  # the engine goes on


# ----- options of the diffusers kind (pure) -----


def test_parse_options():
    te = parse_options({"with": "text_encoder", "max_new_tokens": "64", "timeout": 5, "default": "on"})
    assert (te.with_, te.max_new_tokens, te.timeout, te.default) == ("text_encoder", 64, 5.0, True)
    assert parse_options({}).default is False and parse_options({"default": False}).with_ == "text_encoder"
    chat = parse_options({"with": "chat", "base_url": "http://h/v1", "model": "m", "api_key": "", "temperature": 0})
    assert (chat.api_key, chat.temperature) == (None, 0.0)
    bad = [
        {"with": "llm"}, {"base_url": "http://h/v1"}, {"with": "chat", "model": "m"},
        {"with": "chat", "base_url": "ftp://h", "model": "m"}, {"max_new_tokens": 0}, {"timeout": 0},
        {"default": "maybe"}, {"with": "chat", "base_url": "http://h", "model": "m", "temperature": 3},
    ]
    for options in bad:
        with pytest.raises(ValueError, match="prompt_enhancement"):
            parse_options(options)


def test_chat_wire_format():
    options = parse_options({"with": "chat", "base_url": "http://h/v1", "model": "qwen-plus", "max_new_tokens": 99,
                             "temperature": 0.3})
    body = chat_body(options, "INSTRUCTION", "a fox")
    assert body["model"] == "qwen-plus" and body["max_tokens"] == 99 and body["temperature"] == 0.3
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][0]["content"] == "INSTRUCTION" and "a fox" in body["messages"][1]["content"]
    assert chat_answer({"choices": [{"message": {"content": "x"}, "finish_reason": "length"}]}) == ("x", "length")
    assert chat_answer({"choices": [{"message": {"content": [{"type": "text", "text": "y"}]}}]})[0] == "y"
    assert chat_answer({"choices": []})[0] is None and chat_answer({"choices": [{"message": {}}]})[0] is None


def test_bad_options_leave_the_route_unusable(tmp_path, tiny_dir):
    from proxy.providers import build_providers

    config = parse_config(local_config(tmp_path, tiny_dir, prompt_enhancement={"with": "chat", "model": "m"}), env={})
    provider = build_providers(config)["local"]
    assert "prompt_enhancement.base_url is required" in provider.unavailable_reason


# ----- through the proxy -----


def decode(item) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
    im.load()
    return im


async def test_text_encoder_route_returns_the_revised_prompt(start_proxy, tmp_path, tiny_dir):
    config = local_config(tmp_path, tiny_dir, prompt_enhancement={"with": "text_encoder", "max_new_tokens": TOKENS})
    server, client = await start_proxy(config)

    async def make(prompt, **extra):
        return await client.images.generate(model="tiny", prompt=prompt, response_format="b64_json",
                                            extra_body={"seed": 5, **extra})

    r = await make("a red fox", prompt_enhancement="on")
    revised = r.data[0].revised_prompt
    assert revised and revised != "a red fox"
    image = decode(r.data[0])
    assert (image.format, image.size) == ("PNG", (64, 64))
    direct = await make(revised, prompt_enhancement="off")
    assert direct.data[0].revised_prompt == revised  # nothing rewritten: the prompt as given
    assert np.array_equal(pixels(decode(direct.data[0])), pixels(image))
    # The route's default is off; url responses and streams carry the revised prompt too.
    assert (await make("a red fox")).data[0].revised_prompt == "a red fox"
    url = await client.images.generate(model="tiny", prompt="a red fox", response_format="url",
                                       extra_body={"seed": 5, "prompt_enhancement": "on"})
    assert url.data[0].revised_prompt == revised and url.data[0].url
    stream = await client.images.generate(model="tiny", prompt="a red fox", stream=True,
                                          extra_body={"seed": 5, "prompt_enhancement": "on"})
    events = [e async for e in stream]
    assert events[-1].type == "image_generation.completed" and events[-1].revised_prompt == revised


class FakeChat:
    """An OpenAI-compatible POST /v1/chat/completions: its answer depends on the prompt's first word."""

    def __init__(self):
        self.requests: list[tuple[dict, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append((body, request.headers.get("Authorization", "")))
        prompt = body["messages"][-1]["content"].split("\n\n", 1)[1]
        word = prompt.split()[0]
        if word == "fail":  # an error that echoes the key back
            return web.json_response({"error": {"message": f"upstream broke ({SECRET})", "type": "server_error"}},
                                     status=500)
        if word == "slow":
            await asyncio.sleep(30)
        content = f"Rewritten prompt: {prompt}, at dawn, golden light\n"
        if word == "echo":
            content = f"{prompt} beside {SECRET}"
        return web.json_response({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18},
        })


async def test_chat_route(start_proxy, aiohttp_server, tmp_path, tiny_dir, caplog):
    fake = FakeChat()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.handle)
    upstream = await aiohttp_server(app)
    options = {"with": "chat", "base_url": str(upstream.make_url("/v1")), "api_key": "${ENHANCE_KEY}",
               "model": "qwen-plus", "max_new_tokens": 120, "timeout": 0.5, "default": "on"}
    server, client = await start_proxy(local_config(tmp_path, tiny_dir, prompt_enhancement=options),
                                       env={"ENHANCE_KEY": SECRET})
    bodies = []

    async def make(prompt, **extra):
        r = await client.images.generate(model="tiny", prompt=prompt, response_format="b64_json",
                                         extra_body={"seed": 2, **extra})
        bodies.append(r.model_dump_json())
        return r

    with caplog.at_level(logging.INFO):
        r = await make("a red fox")  # the route's default is on
        assert r.data[0].revised_prompt == "a red fox, at dawn, golden light"
        body, auth = fake.requests[-1]
        assert auth == f"Bearer {SECRET}" and body["model"] == "qwen-plus" and body["max_tokens"] == 120
        assert body["messages"][0]["role"] == "system" and "a red fox" in body["messages"][1]["content"]
        direct = await make("a red fox, at dawn, golden light", prompt_enhancement="off")
        assert len(fake.requests) == 1  # "off": not asked
        assert np.array_equal(pixels(decode(direct.data[0])), pixels(decode(r.data[0])))
        assert decode(r.data[0]).size == (64, 64)

        # An upstream error or a timeout: the image from the prompt as given, revised_prompt = the prompt.
        failed = await make("fail a fox")
        assert failed.data[0].revised_prompt == "fail a fox" and decode(failed.data[0]).size == (64, 64)
        started = time.monotonic()
        slow = await make("slow a fox")
        assert slow.data[0].revised_prompt == "slow a fox" and time.monotonic() - started < 15  # not the 30 s
        assert np.array_equal(pixels(decode(slow.data[0])),
                              pixels(decode((await make("slow a fox", prompt_enhancement="off")).data[0])))
        echoed = await make("echo a fox")
        assert "[redacted]" in echoed.data[0].revised_prompt
    assert "prompt not rewritten (HTTP 500: upstream broke" in caplog.text
    assert "prompt not rewritten (no answer in 0.5 s" in caplog.text
    assert all(SECRET not in text for text in bodies)
    assert SECRET not in caplog.text


class NewerOpenAIChat(FakeChat):
    """As OpenAI's newer models answer: max_tokens refused with a 400 naming it, max_completion_tokens taken.
    `old=True`: a server that knows only max_tokens (it refuses the other name)."""

    def __init__(self, old: bool = False):
        super().__init__()
        self.refused = "max_completion_tokens" if old else "max_tokens"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.refused in body:
            self.requests.append((body, request.headers.get("Authorization", "")))
            wanted = "max_tokens" if self.refused == "max_completion_tokens" else "max_completion_tokens"
            return web.json_response({"error": {
                "message": f"Unsupported parameter: '{self.refused}' is not supported with this model. "
                           f"Use '{wanted}' instead.",
                "type": "invalid_request_error", "param": self.refused, "code": "unsupported_parameter"}},
                status=400)
        return await super().handle(request)


@pytest.mark.parametrize("token_param", ["auto", "max_completion_tokens", "max_tokens"])
async def test_chat_token_parameter_name(aiohttp_server, token_param, caplog):
    import aiohttp

    from proxy.providers.enhance import ChatEnhancer

    caplog.set_level(logging.INFO)
    fakes = {"new": NewerOpenAIChat(), "old": NewerOpenAIChat(old=True)}
    app = web.Application()
    for name, fake in fakes.items():
        app.router.add_post(f"/{name}/v1/chat/completions", fake.handle)
    upstream = await aiohttp_server(app)

    def enhancer(which: str) -> ChatEnhancer:
        options = parse_options({"with": "chat", "base_url": str(upstream.make_url(f"/{which}/v1")), "model": "m",
                                 "max_new_tokens": 77, "token_param": token_param})
        return ChatEnhancer(options, "local")

    sent = {}  # upstream -> the token bound's names, request by request
    async with aiohttp.ClientSession() as http:
        for which, fake in fakes.items():
            chat = enhancer(which)
            answers = [await chat.rewrite(http, "a red fox"), await chat.rewrite(http, "a red fox")]
            sent[which] = [next(k for k in body if k.startswith("max_")) for body, _ in fake.requests]
            assert all(body[sent[which][i]] == 77 for i, (body, _) in enumerate(fake.requests))
            if token_param == "auto" or token_param == {"new": "max_completion_tokens", "old": "max_tokens"}[which]:
                assert answers == ["a red fox, at dawn, golden light"] * 2, which
            else:  # the name asked for, and nothing else: the upstream's 400, the prompt as given
                assert answers == [None, None]
                assert "prompt not rewritten (HTTP 400: Unsupported parameter" in caplog.text
    if token_param == "auto":
        # a refusal naming max_tokens: asked again once with max_completion_tokens, which the route keeps
        assert sent["new"] == ["max_tokens", "max_completion_tokens", "max_completion_tokens"]
        assert sent["old"] == ["max_tokens", "max_tokens"]  # never asked with the other name
        assert "refuses max_tokens; sending max_completion_tokens from now on" in caplog.text
    else:
        assert sent["new"] == sent["old"] == [token_param] * 2
    with pytest.raises(ValueError, match="token_param must be one of"):
        parse_options({"with": "chat", "base_url": "http://h/v1", "model": "m", "token_param": "max_output_tokens"})


class CountingChat(FakeChat):
    """Each answer is another rewrite (numbered), slow enough that parallel calls overlap."""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append((body, ""))
        await asyncio.sleep(0.2)
        prompt = body["messages"][-1]["content"].split("\n\n", 1)[1]
        return web.json_response({"choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": f"{prompt}, rewrite {len(self.requests)}"}}]})


async def test_chat_rewrite_once_for_n_above_max_batch(start_proxy, aiohttp_server, tmp_path, tiny_dir):
    """n = 3 on a route that makes 1 image per call: the router makes 3 parallel calls, which share
    one rewrite, so every image is made from the same prompt (the one revised_prompt says)."""
    fake = CountingChat()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.handle)
    upstream = await aiohttp_server(app)
    options = {"with": "chat", "base_url": str(upstream.make_url("/v1")), "model": "m", "default": "on"}
    server, client = await start_proxy(local_config(tmp_path, tiny_dir, prompt_enhancement=options, max_batch=1))
    r = await client.images.generate(model="tiny", prompt="a red fox", n=3, response_format="b64_json",
                                     extra_body={"seed": 4})
    assert len(fake.requests) == 1
    assert [d.revised_prompt for d in r.data] == ["a red fox, rewrite 1"] * 3
    # the images are those of the rewritten prompt: the same request, rewriting off, from the revised one
    plain = await client.images.generate(model="tiny", prompt="a red fox, rewrite 1", n=3, response_format="b64_json",
                                         extra_body={"seed": 4, "prompt_enhancement": "off"})
    for got, want in zip(r.data, plain.data, strict=True):
        assert np.array_equal(pixels(decode(got)), pixels(decode(want)))
    # a later request is rewritten again (nothing is kept once a rewrite is done)
    await client.images.generate(model="tiny", prompt="a red fox", response_format="b64_json")
    assert len(fake.requests) == 2
