"""The `ray` kind: a real Ray cluster on this machine, a two-replica Serve pool of the tiny model
(local_backend.ray_app), and the proxy in front of it through a Serve handle and over Serve's HTTP ingress.

The pool tests carry the `ray` marker (pytest -m ray); the first few tests are pure (the wire format,
the options, the Serve config) and need no ray.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
from openai import RateLimitError  # noqa: E402
from PIL import Image  # noqa: E402

from local_backend import EngineConfig, GenerationParams, LoraSpec  # noqa: E402
from local_backend.ray_options import deployment_options, serve_application  # noqa: E402
from local_backend.ray_wire import error_reply, params_from_wire, params_to_wire  # noqa: E402
from local_backend.tiers import tier_summary  # noqa: E402
from proxy import parse_config  # noqa: E402
from proxy.app import GATEWAY  # noqa: E402
from proxy.providers import build_providers  # noqa: E402

from .conftest import base_config  # noqa: E402
from .ray_helpers import (  # noqa: E402
    APP,
    EDIT_POOL,
    ENGINE,
    POOL,
    ROUTE,
    kill_replica,
    replica_actor_names,
    wait_pool,
)
from .test_jobs_e2e import http, wait_progress  # noqa: E402

MODEL = "tiny"
TINY_SIZES = {"default": "64x64", "max_side": 256, "tiers": {"0.004": {"1:1": "64x64"}}}


# ---- pure: options, wire format, Serve config --------------------------------------------------------


def ray_config(tmp_path, provider: dict | None = None, **overrides) -> dict:
    cfg = base_config(tmp_path, **overrides)
    cfg["providers"]["pool"] = {"kind": "ray", "app_name": APP, "route_prefix": ROUTE, "status_interval": 0.5,
                                **POOL, **(provider or {})}
    cfg["size_tables"]["tiny"] = copy.deepcopy(TINY_SIZES)
    cfg["models"] = {MODEL: {"sizes": "tiny", "routes": ["pool"]}}
    return cfg


def test_a_replica_that_answered_is_kept_until_its_stats_arrive(tmp_path):
    """A reply names its replica before that replica's first stats report reaches the stats actor: the
    next poll must not forget it (and what this proxy counted it served); one long silent is gone."""
    pool = build_providers(parse_config(ray_config(tmp_path), env={}))["pool"]
    pool._remember({"replica": "new", "queue_depth": 0}, served=1)
    pool._update({"old": {"replica": "old", "queue_depth": 1}})
    assert pool.replicas["new"]["served"] == 1 and pool.replicas["old"]["queue_depth"] == 1
    pool.replicas["new"]["seen"] -= 60
    pool._update({"old": {"replica": "old", "queue_depth": 0}})
    assert set(pool.replicas) == {"old"}


def test_options_are_strict(tmp_path):
    providers = build_providers(parse_config(ray_config(tmp_path), env={}))
    pool = providers["pool"]
    assert pool.deployment["num_replicas"] == 2 and pool.deployment["max_ongoing_requests"] == 4
    assert pool.capabilities.max_images_per_call == ENGINE["max_batch"]
    with pytest.raises(Exception, match="modle"):
        build_providers(parse_config(ray_config(tmp_path, {"engine": {"modle": "tiny"}}), env={}))
    with pytest.raises(Exception, match="either num_replicas"):
        build_providers(parse_config(ray_config(tmp_path, {"max_replicas": 4}), env={}))
    with pytest.raises(Exception, match="replicas"):
        parse_config(ray_config(tmp_path, {"replicas": 4}), env={})
    scaled = deployment_options({"engine": {"model": "Qwen/Qwen-Image"}, "min_replicas": 0, "max_replicas": 8})
    assert scaled["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 8, "target_ongoing_requests": 4.0}
    assert scaled["ray_actor_options"] == {"num_gpus": 1}  # one GPU per replica unless on the CPU
    assert scaled["max_ongoing_requests"] == 2 * 4  # two batches; Serve holds the rest


def test_wire_round_trip():
    mask = Image.new("LA", (8, 8))
    params = GenerationParams("a fox", width=64, height=48, seed=5, n=2, loras=[LoraSpec("style", 0.5)],
                              images=[Image.new("RGB", (8, 8), (1, 2, 3))], mask=mask, partial_images=2,
                              deadline=time.monotonic() + 30, on_partial=lambda *a: None)
    wire = params_to_wire(params)
    assert "on_partial" not in wire and "on_step" not in wire and "cfg_scale" not in wire  # defaults stay home
    assert isinstance(wire["images"][0], bytes) and abs(wire["deadline"] - (time.time() + 30)) < 1
    back = params_from_wire(wire)
    assert (back.prompt, back.width, back.height, back.seed, back.n) == ("a fox", 64, 48, 5, 2)
    assert back.loras == [LoraSpec("style", 0.5)] and back.images[0].getpixel((0, 0)) == (1, 2, 3)
    assert back.mask.mode == "LA" and abs(back.deadline - (time.monotonic() + 30)) < 1
    assert back.on_partial is None and back.partial_images == 2  # only the stream method makes previews
    from local_backend import InvalidParamsError, QueueFullError

    with pytest.raises(InvalidParamsError, match="future_field"):
        params_from_wire({"prompt": "x", "future_field": 1})
    assert error_reply(QueueFullError(retry_after=2.5))["type"] == "queue_full"


def test_a_replica_decodes_a_large_jpeg_at_the_scale_the_edit_needs():
    """A 2048x2048 JPEG for a 512x512 edit: read at half scale (the pipeline conditions on ~1 MP), not
    expanded to 16 MB of pixels; a PNG mask sent at the image's size follows it."""
    photo, mask = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (2048, 2048), (10, 20, 30)).save(photo, format="JPEG")
    Image.new("LA", (2048, 2048)).save(mask, format="PNG")
    wire = {"prompt": "x", "width": 512, "height": 512, "images": [photo.getvalue()], "mask": mask.getvalue()}
    params = params_from_wire(wire)
    assert params.images[0].size == (1024, 1024) and params.mask.size == (1024, 1024)
    small_mask = io.BytesIO()
    Image.new("LA", (64, 64)).save(small_mask, format="PNG")
    params = params_from_wire({**wire, "mask": small_mask.getvalue()})
    assert params.mask.size == (64, 64)  # a mask of another size stays so: the engine names the mismatch


def test_replies_map_to_the_proxy_errors():
    from local_backend import DeadlineExceededError, EngineError, InvalidParamsError, QueueFullError
    from proxy.errors import InvalidRequest, RateLimited, UpstreamError, UpstreamTimeout
    from proxy.providers.ray_convert import reply_error

    def mapped(exc):
        return reply_error({"ok": False, "error": error_reply(exc)})

    full = mapped(QueueFullError(retry_after=2.5))
    assert isinstance(full, RateLimited) and full.headers["Retry-After"] == "3"
    bad = mapped(InvalidParamsError("seed must be an integer", "seed"))
    assert isinstance(bad, InvalidRequest) and bad.param == "seed" and not bad.retryable
    assert isinstance(mapped(DeadlineExceededError()), UpstreamTimeout)
    broken = mapped(EngineError("out of GPU memory"))
    assert type(broken) is UpstreamError and broken.retryable and "out of GPU memory" in broken.message


def test_pool_engine_options_in_their_models_yaml_forms(tmp_path):
    from local_backend.accel_options import parse_cache, parse_compile, quant_skip
    from local_backend.config import PromptEnhancement
    from local_backend.enhance import parse_spec
    from local_backend.ray_options import engine_config

    config = engine_config({
        "model": "Qwen/Qwen-Image", "attention_backend": "_flash_3",
        "compile": {"warm_sizes": [[1024, 1024], "1664x928"], "mode": "max-autotune-no-cudagraphs"},
        "cache": {"default": "regular", "high": {"residual_diff_threshold": 0.3}},
        "quantization": "float8wo", "quantization_skip": ["img_in", "transformer_blocks.{last}"],
        "prompt_enhancement": {"with": "text_encoder", "max_new_tokens": 64, "default": "on"},
        "tiers": {"l8": {"steps": 8, "cfg_scale": 1.0}}, "quality_tiers": {"medium": "l8"},
    })
    assert parse_compile(config.compile).warm_sizes == [(1024, 1024), (1664, 928)]
    cache = parse_cache(config.cache)
    assert cache.default == "regular" and cache.levels["high"]["residual_diff_threshold"] == 0.3
    assert config.attention_backend == "_flash_3" and quant_skip(config, 60) == ["img_in", "transformer_blocks.59"]
    assert parse_spec(config.prompt_enhancement) == PromptEnhancement(max_new_tokens=64, default=True)
    # with: chat is the proxy's: the replicas rewrite nothing, the provider asks the chat upstream
    chat = {"with": "chat", "base_url": "https://chat.example/v1", "model": "qwen-plus", "default": "on"}
    assert engine_config({"prompt_enhancement": chat}).prompt_enhancement is None
    pool = build_providers(parse_config(ray_config(tmp_path, {"engine": {**ENGINE, "prompt_enhancement": chat}}),
                                        env={}))["pool"]
    assert pool.chat_enhancer is not None and pool.engine_config.prompt_enhancement is None
    bad = [({"cache": {"high": {"threshold": 1}}}, "cache.high: unknown key"),
           ({"compile": {"mode": "fast"}}, "compile.mode"),
           ({"attention_backend": "flsh"}, "not one of diffusers' backends"),
           ({"quantization_skip": ["img_in"]}, "quantization_skip applies to"),
           ({"prompt_enhancement": {"with": "gpt"}}, "prompt_enhancement.with"),
           ({"prompt_enhancement": {"max_new_tokens": 0}}, "max_new_tokens"),
           ({"tiers": {"base": {}}}, "built in"),
           ({"offload": "disk"}, "offload must be")]
    for options, message in bad:  # a config error before anything is deployed, not replicas that fail to start
        with pytest.raises(ValueError, match=message):
            engine_config(options)
        with pytest.raises(Exception, match=message):
            build_providers(parse_config(ray_config(tmp_path, {"engine": {**ENGINE, **options}}), env={}))


def test_a_pool_lists_the_tiers_and_cache_levels_of_its_engine_options(tmp_path):
    """/v1/models and the playground's speed-tier field read these: a pool lists what an in-process provider
    of the same engine options lists."""
    cfg = ray_config(tmp_path)
    cfg["providers"]["local"] = {"kind": "diffusers", **ENGINE}
    providers = build_providers(parse_config(cfg, env={}))
    assert [t["name"] for t in providers["pool"].tiers] == ["base", "fast"]
    assert providers["pool"].tiers == providers["local"].tiers
    assert providers["pool"].accelerations == providers["local"].accelerations == ["none", "regular", "high"]
    plain = {k: v for k, v in ENGINE.items() if k not in ("tiers", "quality_tiers", "cache")}
    cfg = ray_config(tmp_path, {"engine": plain})
    cfg["providers"]["local"] = {"kind": "diffusers", **plain}
    providers = build_providers(parse_config(cfg, env={}))
    assert providers["pool"].tiers is providers["local"].tiers is None
    assert providers["pool"].accelerations is providers["local"].accelerations is None


def test_serve_config_for_kuberay(tmp_path, capsys):
    import yaml

    from proxy.cli import main

    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(ray_config(tmp_path)))
    main(["ray-serve", "--config", str(path), "--print-config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    app = printed["applications"][0]
    assert app["import_path"] == "local_backend.ray_app:build_app" and app["route_prefix"] == ROUTE
    assert app == serve_application(APP, POOL, ROUTE)


# ---- a real pool ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_pool():
    pytest.importorskip("ray.serve")
    from .ray_helpers import start_pool, stop_pool

    pool = start_pool()
    yield pool
    stop_pool()


@pytest.fixture(scope="module")
def reference():
    """The in-process engine on the same tiny model: what the pool must answer."""
    from local_backend import Engine, EngineConfig

    engine = Engine(EngineConfig(**ENGINE))
    engine.start()
    yield engine
    engine.close()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def b64_pixels(item) -> np.ndarray:
    return pixels(base64.b64decode(item.b64_json))


async def start(start_proxy, tmp_path, provider: dict | None = None, **overrides):
    server, client = await start_proxy(ray_config(tmp_path, provider, **overrides))
    pool = server.app[GATEWAY].providers["pool"]
    assert await pool.wait_ready(60), pool.unavailable_reason
    return server, client, pool


async def generate(client, prompt="a red fox", **extra):
    return await client.images.generate(model=MODEL, prompt=prompt, size="64x64", response_format="b64_json",
                                        n=extra.pop("n", 1), extra_body=extra or None)


@pytest.mark.ray
@pytest.mark.parametrize("transport", ["handle", "http"])
async def test_same_image_as_the_engine(ray_pool, reference, start_proxy, tmp_path, transport):
    provider = {"transport": transport}
    if transport == "http":
        provider["http_url"] = ray_pool.http_url
    server, client, pool = await start(start_proxy, tmp_path, provider)
    r = await generate(client, n=2, seed=7, num_inference_steps=3, cfg_scale=2.0, negative_prompt="blur")
    expected = reference.generate_sync(GenerationParams("a red fox", width=64, height=64, seed=7, n=2,
                                                        num_inference_steps=3, cfg_scale=2.0, negative_prompt="blur"))
    for item, image in zip(r.data, expected.images, strict=True):
        want = np.asarray(image.convert("RGB")).astype(np.int16)
        assert int(np.abs(b64_pixels(item) - want).max()) <= 1
    # /ready and /metrics show the pool.
    async with aiohttp.ClientSession() as s:
        async with s.get(server.make_url("/ready")) as resp:
            route = (await resp.json())["models"][MODEL]["routes"][0]
        async with s.get(server.make_url("/metrics")) as resp:
            metrics = await resp.text()
    assert route["transport"] == transport and route["replicas"] == {"RUNNING": 2}
    # /v1/models lists the pool's speed tiers and cache levels, as for an in-process engine of its options.
    card = (await client.models.retrieve(MODEL)).model_extra["capabilities"]
    assert card["tiers"] == tier_summary(EngineConfig(**ENGINE))
    assert [t["name"] for t in card["tiers"]] == ["base", "fast"]
    assert card["accelerations"] == ["none", "regular", "high"]
    assert sum(s["served"] for s in route["replica_stats"].values()) >= 1
    assert 'qip_local_queue_depth{provider="pool"}' in metrics
    # The replicas measured their GPU time: the usage ledger and /metrics have it.
    assert f'qip_gpu_seconds_total{{model="{MODEL}",route="pool"}}' in metrics
    usage = server.app[GATEWAY].usage
    await usage.writer.flush()
    (record,) = await usage.writer.backend.query(0, time.time() + 10)
    assert record.route == "pool" and record.gpu_seconds > 0 and record.images_delivered == 2
    # prompt_enhancement on: the replica rewrites with its text encoder and the rewrite comes back,
    # and the image is the one the in-process engine makes from that rewritten prompt.
    r = await generate(client, seed=3, prompt_enhancement="on")
    revised = r.data[0].revised_prompt
    assert revised and revised != "a red fox"
    expected = reference.generate_sync(GenerationParams(revised, width=64, height=64, seed=3))
    want = np.asarray(expected.images[0].convert("RGB")).astype(np.int16)
    assert int(np.abs(b64_pixels(r.data[0]) - want).max()) <= 1

    # The speed options reach the replicas: a replica's option warning is the route's in /ready (from the
    # replicas' stats reports, read every status_interval) ...
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as s:
        while "warnings" not in route and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            async with s.get(server.make_url("/ready")) as resp:
                route = (await resp.json())["models"][MODEL]["routes"][0]
    assert any(w.startswith("cache.regular: ") and "2 blocks" in w for w in route.get("warnings", [])), route
    assert "warnings" not in next(iter(route["replica_stats"].values()))  # once, for the route

    def made(**fields) -> np.ndarray:
        done = reference.generate_sync(GenerationParams("a red fox", width=64, height=64, seed=5, **fields))
        return np.asarray(done.images[0].convert("RGB")).astype(np.int16)

    # ... fal's acceleration picks the replica's cache level (on the tiny model a cached image differs
    # from the uncached one by 1 in about 15 % of its pixel values) ...
    high = b64_pixels((await generate(client, seed=5, num_inference_steps=4, acceleration="high")).data[0])
    assert np.abs(high - made(num_inference_steps=4, acceleration="high")).mean() < 0.02
    assert np.abs(high - made(num_inference_steps=4)).mean() > 0.05
    # ... and OpenAI's quality picks the tier (quality_tiers: low -> fast: 1 step, no CFG).
    low = await client.images.generate(model=MODEL, prompt="a red fox", size="64x64", quality="low",
                                       response_format="b64_json", extra_body={"seed": 5})
    assert int(np.abs(b64_pixels(low.data[0]) - made(tier="fast")).max()) <= 1
    assert int(np.abs(b64_pixels(low.data[0]) - made()).max()) > 1


@pytest.mark.ray
async def test_chat_prompt_enhancement_is_done_by_the_proxy(ray_pool, reference, start_proxy, aiohttp_server,
                                                            tmp_path):
    from aiohttp import web

    asked = []

    async def chat(request):
        body = await request.json()
        asked.append(body)
        prompt = body["messages"][-1]["content"].split("\n\n", 1)[1]
        return web.json_response({"choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": f"{prompt} at dusk"}}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    upstream = await aiohttp_server(app)
    options = {"with": "chat", "base_url": str(upstream.make_url("/v1")), "model": "m", "default": "on"}
    _, client, _ = await start(start_proxy, tmp_path, {"engine": {**ENGINE, "prompt_enhancement": options}})
    r = await generate(client, "a red fox", n=3, seed=6)  # 2 calls to the pool (max_batch 2), one rewrite
    assert len(asked) == 1 and [d.revised_prompt for d in r.data] == ["a red fox at dusk"] * 3
    expected = reference.generate_sync(GenerationParams("a red fox at dusk", width=64, height=64, seed=6, n=3))
    for item, image in zip(r.data, expected.images, strict=True):
        want = np.asarray(image.convert("RGB")).astype(np.int16)
        assert int(np.abs(b64_pixels(item) - want).max()) <= 1


@pytest.mark.ray
async def test_requests_spread_over_both_replicas(ray_pool, start_proxy, tmp_path):
    _, client, pool = await start(start_proxy, tmp_path)
    served_before = {rid: s["served"] for rid, s in pool.replicas.items()}
    results = await asyncio.gather(*(generate(client, f"fox {i}", seed=i, num_inference_steps=6) for i in range(8)))
    assert all(len(r.data) == 1 for r in results)
    served = {rid: s["served"] - served_before.get(rid, 0) for rid, s in pool.replicas.items()}
    assert sum(served.values()) == 8
    assert len([n for n in served.values() if n > 0]) == 2, served  # each replica made some


@pytest.mark.ray
@pytest.mark.parametrize("transport", ["handle", "http"])
async def test_partial_images_stream_through_the_pool(ray_pool, start_proxy, tmp_path, transport):
    _, client, _ = await start(start_proxy, tmp_path, {"transport": transport, "http_url": ray_pool.http_url})
    stream = await client.images.generate(model=MODEL, prompt="a kite", size="64x64", stream=True,
                                          partial_images=2, extra_body={"seed": 3, "num_inference_steps": 4})
    events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert pixels(base64.b64decode(events[-1].b64_json)).shape == (64, 64, 3)


TRACE_APP, TRACE_ROUTE = "qip-trace", "/qip-trace"


@pytest.mark.ray
@pytest.mark.parametrize("transport", ["handle", "http"])
async def test_one_trace_spans_the_proxy_and_a_replica(ray_pool, start_proxy, tmp_path, aiohttp_server,
                                                      monkeypatch, transport):
    """The proxy sends its trace context with the call; a replica whose environment names the collector
    exports its spans into the same trace, under the proxy's pool.call span, with the engine's stages."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    from ray import serve

    from local_backend.ray_app import build_app

    from .otlp_receiver import OtlpReceiver, children, one

    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    receiver = await OtlpReceiver().start(aiohttp_server)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "50",
           "OTEL_SERVICE_NAME": "qip-pool-test"}
    # Two replicas of their own (the collector is named in their environment), beside the shared pool.
    pool = {**POOL, "ray_actor_options": {"num_cpus": 0.25, "runtime_env": {"env_vars": env}}}
    serve.run(build_app(pool), name=TRACE_APP, route_prefix=TRACE_ROUTE)
    try:
        provider = {"app_name": TRACE_APP, "route_prefix": TRACE_ROUTE, **pool, "transport": transport,
                    "http_url": ray_pool.http_url}
        cfg = ray_config(tmp_path, provider)
        cfg["telemetry"] = {"otlp_endpoint": receiver.url, "service_name": "qip-proxy-test"}
        server, client = await start_proxy(cfg)
        r = await client.images.generate(model=MODEL, prompt="a fox", size="64x64", response_format="b64_json",
                                         extra_body={"seed": 1, "num_inference_steps": 3},
                                         extra_headers={"X-Request-Id": f"req-ray-{transport}"})
        assert pixels(base64.b64decode(r.data[0].b64_json)).shape == (64, 64, 3)
        spans = await receiver.trace_with("POST /v1/images/generations", **{"qip.request_id": f"req-ray-{transport}"})
        trace_id = spans[0].trace_id
        deadline = time.monotonic() + 60
        while not [s for s in receiver.spans if s.trace_id == trace_id and s.name == "engine.vae_decode"]:
            assert time.monotonic() < deadline, [s.name for s in receiver.spans]
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        spans = [s for s in receiver.spans if s.trace_id == trace_id]
        root = one(spans, "POST /v1/images/generations")
        (attempt,) = children(spans, root, "route_attempt")
        (call,) = children(spans, attempt, "pool.call")
        assert call.attributes["qip.transport"] == transport and call.service == "qip-proxy-test"
        # The replica's spans: another process, the same trace, under the proxy's call.
        (replica,) = [s for s in spans if s.name == "pool.generate"]
        assert replica.service == "qip-pool-test" and replica.kind == 2  # SERVER
        assert replica.parent_id == call.span_id  # the context travels with the call's parameters
        if transport == "http":  # and the HTTP call itself is a client span of the proxy's
            (post,) = children(spans, call, "POST")
            assert post.attributes["http.response.status_code"] == 200
        assert replica.attributes["qip.replica"] == call.attributes["qip.replica"]
        assert replica.attributes["qip.pid"] != __import__("os").getpid()
        assert [c.name for c in children(spans, replica)][:2] == ["engine.queue_wait", "engine.call"]
        (engine_call,) = children(spans, replica, "engine.call")
        (denoise,) = children(spans, engine_call, "engine.denoise")
        assert denoise.attributes["qip.engine.steps_run"] == 3
        assert [c.name for c in children(spans, engine_call)][-1] == "engine.vae_decode"
    finally:
        serve.delete(TRACE_APP)


@pytest.mark.ray
@pytest.mark.parametrize("transport", ["handle", "http"])
async def test_disconnect_cancels_the_replica_job(ray_pool, start_proxy, tmp_path, transport):
    provider = {"transport": transport, "http_url": ray_pool.http_url}
    server, _, _ = await start(start_proxy, tmp_path, provider)
    before = sum(s["cancelled"] for s in (await wait_pool(bool)).values())
    body = {"model": MODEL, "prompt": "slow", "size": "64x64", "num_inference_steps": 500}

    async def post():
        async with aiohttp.ClientSession() as s, s.post(server.make_url("/v1/images/generations"), json=body,
                                                        headers={"Authorization": "Bearer test"}) as resp:
            await resp.read()

    task = asyncio.create_task(post())
    await wait_pool(lambda st: sum(s["active"] for s in st.values()) == 1)  # in a replica
    await asyncio.sleep(0.3)  # and running there
    task.cancel()  # the client hangs up
    await asyncio.gather(task, return_exceptions=True)
    await wait_pool(lambda st: sum(s["cancelled"] for s in st.values()) > before
                    and sum(s["active"] for s in st.values()) == 0)


@pytest.mark.ray
@pytest.mark.parametrize("transport", ["handle", "http"])
async def test_a_background_job_shows_the_replicas_steps_and_cancel_stops_it(ray_pool, start_proxy, tmp_path,
                                                                              transport):
    provider = {"transport": transport, "http_url": ray_pool.http_url}
    server, client, _ = await start(start_proxy, tmp_path, provider,
                                    jobs={"path": str(tmp_path / "jobs.sqlite3")})
    before = sum(s["cancelled"] for s in (await wait_pool(bool)).values())
    raw = await client.images.with_raw_response.generate(
        model=MODEL, prompt="slow", size="64x64", extra_body={"background": True, "num_inference_steps": 500})
    assert raw.http_response.status_code == 202
    job_id = raw.http_response.json()["id"]
    job = await wait_progress(server, job_id, client.api_key)  # the steps the replica reports reach the job
    assert job["status"] == "in_progress"
    assert job["progress"]["steps_total"] == 500 and 0 < job["progress"]["steps_done"] < 500
    status, _, job = await http(server, "POST", f"/v1/images/jobs/{job_id}/cancel", client.api_key)
    assert status == 200 and job["status"] == "cancelled"
    await wait_pool(lambda st: sum(s["cancelled"] for s in st.values()) > before
                    and sum(s["active"] for s in st.values()) == 0)


@pytest.mark.ray
async def test_a_full_pool_is_429_with_retry_after(ray_pool, start_proxy, tmp_path):
    _, client, _ = await start(start_proxy, tmp_path, routing={"retries": 0})
    tasks = [asyncio.create_task(generate(client, f"flood {i}", num_inference_steps=300)) for i in range(14)]
    try:
        # 2 replicas x 4 requests, 4 more held by Serve: the rest are turned away at once.
        done, _ = await asyncio.wait(tasks, timeout=20, return_when=asyncio.FIRST_EXCEPTION)
        errors = [t.exception() for t in done if t.exception() is not None]
        assert errors and all(isinstance(e, RateLimitError) for e in errors), errors
        assert float(errors[0].response.headers["retry-after"]) >= 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    # The hang-ups cancel every job: the pool is idle again.
    await wait_pool(lambda st: all(s["active"] == 0 for s in st.values()))


@pytest.fixture(scope="module")
def edit_pool(ray_pool):
    """A second application: the tiny edit model, one replica."""
    from ray import serve

    from local_backend.ray_app import build_app

    options = {**EDIT_POOL, "engine": {**ENGINE, "model": "tiny-edit", "task": "edit"}}
    serve.run(build_app(options), name=f"{APP}-edit", route_prefix=f"{ROUTE}-edit")
    yield options
    serve.delete(f"{APP}-edit")


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.mark.ray
async def test_an_edit_with_a_mask_through_the_pool(edit_pool, start_proxy, tmp_path):
    provider = {**edit_pool, "app_name": f"{APP}-edit", "route_prefix": f"{ROUTE}-edit"}
    cfg = ray_config(tmp_path, provider)
    cfg["models"][MODEL]["max_input_images"] = 3
    server, client = await start_proxy(cfg)
    pool = server.app[GATEWAY].providers["pool"]
    assert await pool.wait_ready(60), pool.unavailable_reason
    assert pool.capabilities.edits and pool.capabilities.masks
    rng = np.random.default_rng(1)
    source = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (8, 8, 40, 32))  # transparent: repaint
    r = await client.images.edit(model=MODEL, image=("in.png", png(source), "image/png"), prompt="a hat",
                                 mask=("mask.png", png(mask), "image/png"), response_format="b64_json",
                                 extra_body={"seed": 2, "num_inference_steps": 2})
    out, src = b64_pixels(r.data[0]), np.asarray(source).astype(np.int16)
    inside = np.zeros((64, 64), bool)
    inside[8:32, 8:40] = True
    assert out.shape == (64, 64, 3)
    assert (out[~inside] == src[~inside]).all()  # the kept area came back exactly: inputs travelled intact
    assert (out[inside] != src[inside]).any()


@pytest.fixture(scope="module")
def pool_21(ray_pool):
    """A third application: the tiny Qwen-Image-2.1 model (generations and edits on one model), one replica."""
    from ray import serve

    from local_backend.ray_app import build_app

    engine = {k: v for k, v in ENGINE.items() if k not in ("tiers", "quality_tiers")}
    options = {**EDIT_POOL, "engine": {**engine, "model": "tiny-2.1"}}
    serve.run(build_app(options), name=f"{APP}-21", route_prefix=f"{ROUTE}-21")
    yield options
    serve.delete(f"{APP}-21")


@pytest.mark.ray
async def test_qwen_image_21_generates_and_edits_through_the_pool(pool_21, start_proxy, tmp_path):
    provider = {**pool_21, "app_name": f"{APP}-21", "route_prefix": f"{ROUTE}-21"}
    cfg = ray_config(tmp_path, provider)
    cfg["models"][MODEL]["max_input_images"] = 3
    server, client = await start_proxy(cfg)
    pool = server.app[GATEWAY].providers["pool"]
    assert await pool.wait_ready(60), pool.unavailable_reason
    assert pool.capabilities.edits  # one model serves both endpoints
    made = [await generate(client, seed=4, n=2) for _ in range(2)]
    first, again = ([b64_pixels(d) for d in r.data] for r in made)
    assert all(p.shape == (64, 64, 3) for p in first)
    assert all((a == b).all() for a, b in zip(first, again, strict=True))  # seeded: the same pixels
    assert (first[0] != first[1]).any()  # image i has seed + i
    rng = np.random.default_rng(2)
    inputs = [("a.png", png(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))), "image/png")
              for _ in range(2)]
    r = await client.images.edit(model=MODEL, image=inputs, prompt="put them together", response_format="b64_json",
                                 extra_body={"seed": 2, "num_inference_steps": 2})
    assert b64_pixels(r.data[0]).shape[2] == 3 and len(r.data) == 1


@pytest.mark.ray
async def test_a_killed_replica_loses_no_request(ray_pool, start_proxy, tmp_path):
    """Last: it leaves the pool with one replica until Serve has started a new one."""
    _, client, pool = await start(start_proxy, tmp_path)
    calls = [client.images.with_raw_response.generate(model=MODEL, prompt=f"k{i}", size="64x64",
                                                       response_format="b64_json",
                                                       extra_body={"seed": i, "num_inference_steps": 250})
             for i in range(4)]
    tasks = [asyncio.create_task(c) for c in calls]
    # A replica is working on some of them (usually both are: Serve picks the less busy of two).
    stats = await wait_pool(lambda st: len(st) == 2 and any(s["active"] for s in st.values()))
    victim = next(rid for rid, s in stats.items() if s["active"])
    name, namespace = next((n, ns) for n, ns in replica_actor_names() if n.endswith(f"#{victim}"))
    kill_replica(name, namespace)
    raws = await asyncio.gather(*tasks)
    assert all(len(raw.parse().data) == 1 for raw in raws)
    # The victim's requests failed there and were retried on the other replica.
    assert max(int(raw.headers["x-qip-attempts"]) for raw in raws) >= 2
