"""local_backend.accel: cache-dit levels per request, compile with warm-up, attention backend, FP8 skip list.

All on the tiny random model on the CPU. cache-dit's levels are set here for a 2-block model (one block
computed, one cacheable) with thresholds that make it cache: the defaults (8 computed blocks) are for
Qwen-Image's 60.
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from openai import BadRequestError  # noqa: E402

from local_backend import Engine, EngineConfig, EngineError, GenerationParams, InvalidParamsError  # noqa: E402
from local_backend import accel as accel_module  # noqa: E402
from local_backend.accel_options import DEFAULT_QUANT_SKIP, parse_cache, parse_compile, quant_skip  # noqa: E402
from local_backend.tiers import choose_tier  # noqa: E402
from proxy.app import GATEWAY  # noqa: E402
from proxy.providers.local_convert import engine_config  # noqa: E402

from .conftest import base_config  # noqa: E402
from .local_helpers import make_lora_file, submit_while_held  # noqa: E402

SIZE = 64
STEPS = 8
LEVELS = {
    "regular": {"Fn_compute_blocks": 1, "residual_diff_threshold": 0.45, "max_warmup_steps": 2},
    "high": {"Fn_compute_blocks": 1, "residual_diff_threshold": 1.0, "max_warmup_steps": 1},
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def params(prompt="a red fox", **kw) -> GenerationParams:
    kw.setdefault("width", SIZE)
    kw.setdefault("height", SIZE)
    kw.setdefault("seed", 1)
    return GenerationParams(prompt, **kw)


def pixels(engine, **kw) -> np.ndarray:
    return np.asarray(engine.generate_sync(params(**kw)).images[0]).astype(np.int16)


def diff(a, b) -> int:
    return int(np.abs(a - b).max())


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_dir):
    folder = tmp_path_factory.mktemp("accel-loras")
    make_lora_file(tiny_dir, folder / "fast.safetensors", seed=3)
    return folder


def tiers(lora_dir) -> dict:
    return {"fast": {"loras": [str(lora_dir / "fast.safetensors")], "steps": 4, "cfg_scale": 1.0}}


@pytest.fixture(scope="module")
def plain(tiny_dir, lora_dir):
    engine = Engine(EngineConfig(model=str(tiny_dir), default_steps=STEPS, tiers=tiers(lora_dir)))
    engine.start()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def cached(tiny_dir, lora_dir):
    engine = Engine(EngineConfig(model=str(tiny_dir), default_steps=STEPS, tiers=tiers(lora_dir), cache=LEVELS))
    engine.start()
    yield engine
    engine.close()


# ----- the options, parsed -----


def test_options_are_checked_with_the_field_named():
    assert parse_compile(True).warm_sizes == [] and parse_compile(False) is None
    spec = parse_compile({"warm_sizes": [[1024, 1024], "928x1664"], "mode": "max-autotune", "dynamic": True})
    assert spec.warm_sizes == [(1024, 1024), (928, 1664)] and spec.mode == "max-autotune" and spec.fullgraph
    assert parse_compile({"warm_sizes": "table"}).warm_sizes[0] == (1328, 1328)
    cache = parse_cache(True)
    assert cache.default == "none" and cache.levels["regular"]["Fn_compute_blocks"] == 8
    assert parse_cache({"high": {"residual_diff_threshold": 0.3}}).levels["high"]["residual_diff_threshold"] == 0.3
    bad = [
        ({"cache": {"none": {}}}, "none is built in"),
        ({"cache": {"turbo": {}}}, "unknown level"),
        ({"cache": {"high": {"threshold": 1}}}, "cache.high: unknown key"),
        ({"cache": {"high": {"Fn_compute_blocks": 0}}}, "cache.high.Fn_compute_blocks"),
        ({"cache": {"default": "max"}}, "cache.default"),
        ({"compile": {"mode": "fast"}}, "compile.mode"),
        ({"compile": {"warm_sizes": [[64]]}}, "compile.warm_sizes"),
        ({"compile": {"sizes": []}}, "compile: unknown key"),
        ({"attention_backend": "flsh"}, "not one of diffusers' backends"),
        ({"quantization_skip": ["img_in"]}, "quantization_skip applies to"),
    ]
    for options, message in bad:
        with pytest.raises(EngineError, match=message):
            Engine(EngineConfig(model="tiny", **options))
        with pytest.raises(ValueError, match=message):  # models.yaml: a config error, before anything loads
            engine_config({"model": "tiny", **options})


def test_acceleration_picks_the_cache_level_once_a_cache_is_configured():
    speed = {"tiers": {"l8": {"steps": 8, "cfg_scale": 1.0}, "l4": {"steps": 4, "cfg_scale": 1.0}},
             "quality_tiers": {"low": "l4"}}
    assert choose_tier(EngineConfig(**speed), acceleration="high") == "l4"  # no cache: today's mapping
    with_cache = EngineConfig(cache=True, **speed)
    assert choose_tier(with_cache, acceleration="high") is None  # the cache's level, not a tier
    assert choose_tier(with_cache, acceleration="high", quality="low") == "l4"
    with pytest.raises(InvalidParamsError):
        choose_tier(with_cache, acceleration="max")


def test_fp8_skip_list_keeps_the_sensitive_layers():
    names = quant_skip(EngineConfig(quantization="float8wo"), 60)
    assert names == [*DEFAULT_QUANT_SKIP[:-1], "transformer_blocks.59"]
    assert quant_skip(EngineConfig(quantization="int8wo", quantization_skip=["img_in", "transformer_blocks.{last}"]),
                      2) == ["img_in", "transformer_blocks.1"]


@pytest.mark.parametrize("quantization, quantized_type", [("int8wo", "Int8Tensor"), ("float8wo", "Float8Tensor")])
def test_torchao_quantization_leaves_the_skipped_layers_unquantized(tiny_dir, quantization, quantized_type):
    stages = []
    engine = Engine(EngineConfig(model=str(tiny_dir), dtype="bfloat16", quantization=quantization,
                                 quantization_skip=["img_in", "transformer_blocks.{last}"], default_steps=2))
    engine.load(stages.append)
    engine.start()
    try:
        transformer = engine.pipe.transformer
        assert type(transformer.img_in.weight).__name__ == "Parameter"  # kept
        assert type(transformer.transformer_blocks[1].attn.to_q.weight).__name__ == "Parameter"  # the last block
        assert type(transformer.transformer_blocks[0].attn.to_q.weight).__name__ == quantized_type
        assert type(transformer.txt_in.weight).__name__ == quantized_type
        assert any("img_in, transformer_blocks.1" in s for s in stages)
        assert engine.generate_sync(params()).images[0].size == (SIZE, SIZE)
    finally:
        engine.close()


# ----- cache levels per request -----


def test_cache_levels_per_request(plain, cached):
    base = pixels(plain)
    assert diff(pixels(cached), base) == 0  # the default level: none
    assert diff(pixels(cached, acceleration="none"), base) == 0  # exactly the engine without cache
    regular, high = pixels(cached, acceleration="regular"), pixels(cached, acceleration="high")
    assert diff(regular, base) > 0 and diff(high, base) > 0 and diff(regular, high) > 0
    for _ in range(2):  # back and forth: none stays exact, each level gives the same image for the seed
        assert diff(pixels(cached, acceleration="high"), high) == 0
        assert diff(pixels(cached, acceleration="none"), base) == 0
        assert diff(pixels(cached, acceleration="regular"), regular) == 0
    # without CFG too (the cache counts one transformer pass per step then)
    assert diff(pixels(cached, acceleration="none", cfg_scale=1.0), pixels(plain, cfg_scale=1.0)) == 0
    assert pixels(cached, acceleration="high", cfg_scale=1.0).shape == (SIZE, SIZE, 3)
    with pytest.raises(InvalidParamsError) as err:
        cached.submit(params(acceleration="max"))
    assert err.value.param == "acceleration"
    assert cached.warnings == [] and cached.accel.summary()["cache_levels"] == ["none", "regular", "high"]


def test_lora_tiers_work_with_the_cache(plain, cached):
    fast = pixels(plain, tier="fast", num_inference_steps=STEPS)
    assert diff(pixels(cached, tier="fast", num_inference_steps=STEPS, acceleration="none"), fast) == 0
    assert diff(pixels(cached, tier="fast", num_inference_steps=STEPS, acceleration="high"), fast) > 0
    assert diff(pixels(cached, tier="fast", num_inference_steps=STEPS), fast) == 0
    assert diff(pixels(cached, num_inference_steps=STEPS), pixels(plain)) == 0  # the tier's LoRA is off again


def test_jobs_of_different_cache_levels_do_not_share_a_call(cached):
    levels = [None, "high", "none", "high", "regular"]
    jobs = submit_while_held(cached, lambda: [cached.submit(params(f"p{i}", seed=10 + i, acceleration=a))
                                              for i, a in enumerate(levels)])
    assert [job.future.result(30).batch_size for job in jobs] == [2, 2, 2, 2, 1]


# ----- compile, failures -----


def test_compile_warms_up_every_tier_at_load_and_requests_do_not_recompile(tiny_dir, lora_dir, plain, request):
    """Every tier is compiled at load, through the engine's own call path (its LoRA on), and the graphs it
    takes fit under torch's per-code-object limit: 8 by default, reached by the real model's warm-ups
    (sizes x batch x cache levels x tiers); 1 here, so that the tiny model's few calls reach it too."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    # torch's own patch, not monkeypatch (whose undo deletes the setting from torch's config module)
    patched = torch._dynamo.config.patch(recompile_limit=1)
    patched.__enter__()
    request.addfinalizer(lambda: patched.__exit__(None, None, None))
    stages = []
    engine = Engine(EngineConfig(model=str(tiny_dir), default_steps=STEPS, max_batch=1, tiers=tiers(lora_dir),
                                 compile={"warm_sizes": [[SIZE, SIZE]], "dynamic": True}))
    engine.load(stages.append)
    engine.start()
    try:
        assert engine.warnings == [] and engine.accel.compiled
        warming = [s.split(": ", 1)[1] for s in stages if s.startswith("warming up the compiled transformer")]
        assert warming == [f"{SIZE}x{SIZE} (1/2)", f"{SIZE}x{SIZE}, tier fast (2/2)"]
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0  # compiled during the load
        fast = pixels(engine, prompt="another prompt, of quite another length than the warm-up's", tier="fast")
        base = pixels(engine, prompt="and one more, for the base model")
        assert counters["stats"]["unique_graphs"] == graphs  # nothing new compiled by the requests
        # inductor's kernels round a little differently; the tier's LoRA is off again for base
        assert diff(pixels(engine), pixels(plain)) <= 2
        assert diff(pixels(engine, tier="fast"), pixels(plain, tier="fast")) <= 2
        assert counters["stats"]["unique_graphs"] == graphs
        assert fast.shape == base.shape == (SIZE, SIZE, 3)
    finally:
        engine.close()


def test_options_that_fail_at_load_leave_the_engine_serving(tiny_dir, plain, monkeypatch):
    engine = Engine(EngineConfig(model=str(tiny_dir), default_steps=STEPS, attention_backend="flash",
                                 compile={"backend": "no-such-backend"},
                                 cache={"regular": {"Fn_compute_blocks": 2}, "high": LEVELS["high"]}))
    engine.start()
    try:
        found = "\n".join(engine.warnings)
        assert "attention_backend flash" in found and "flash-attn" in found
        assert "compile:" in found and "serving uncompiled" in found
        assert "cache.regular" in found and "2 blocks" in found
        summary = engine.accel.summary()
        assert summary == {"attention_backend": None, "compiled": False, "cache_levels": ["none", "high"]}
        # a level that could not be enabled runs uncached: the image of the engine without cache
        assert diff(pixels(engine, acceleration="regular"), pixels(plain)) == 0
    finally:
        engine.close()
    monkeypatch.setattr(accel_module, "installed", lambda package: package != "cache_dit")
    engine = Engine(EngineConfig(model=str(tiny_dir), default_steps=STEPS, cache=LEVELS))
    engine.start()
    try:
        assert engine.warnings == ["cache: cache-dit is not installed (pip install cache-dit); "
                                   "serving without block caching"]
        assert diff(pixels(engine, acceleration="high"), pixels(plain)) == 0
    finally:
        engine.close()


# ----- through the proxy -----


def local_config(tmp_path, tiny_dir, **options) -> dict:
    cfg = base_config(tmp_path)
    cfg["providers"]["local"] = {"kind": "diffusers", "model": str(tiny_dir), "device": "cpu",
                                 "default_steps": STEPS, "load_in_background": False, **options}
    cfg["size_tables"]["tiny"] = {"default": "64x64", "max_side": 256, "tiers": {"0.004": {"1:1": "64x64"}}}
    cfg["models"] = {"tiny": {"sizes": "tiny", "routes": ["local"]}}
    return cfg


async def test_acceleration_and_degraded_options_through_the_proxy(start_proxy, tmp_path, tiny_dir):
    cfg = local_config(tmp_path, tiny_dir, cache=copy.deepcopy(LEVELS), attention_backend="flash",
                       compile={"warm_sizes": "table", "backend": "no-such-backend"})
    server, client = await start_proxy(cfg)
    provider = server.app[GATEWAY].providers["local"]
    assert provider.config.compile["warm_sizes"] == [[64, 64]]  # "table": the sizes the route serves

    resp = await server.app[GATEWAY].http.get(str(server.make_url("/ready")))  # the gateway's own session
    body = await resp.json()
    assert resp.status == 200  # degraded, not down
    route = body["models"]["tiny"]["routes"][0]
    assert route["ready"] is True
    assert any("attention_backend flash" in w for w in route["warnings"])
    assert any(w.startswith("compile:") for w in route["warnings"])
    card = (await client.models.retrieve("tiny")).model_extra["capabilities"]
    assert card["accelerations"] == ["none", "regular", "high"]

    async def image(**extra):
        result = await client.images.generate(model="tiny", prompt="a cat", response_format="b64_json",
                                              extra_body={"seed": 3, **extra})
        return result.data[0].b64_json

    none = await image()
    assert await image(acceleration="none") == none
    high = await image(acceleration="high")
    assert high != none and await image(acceleration="high") == high
    with pytest.raises(BadRequestError) as err:
        await image(acceleration="ludicrous")
    assert err.value.body["param"] == "acceleration"


def test_check_config_reports_bad_and_degraded_options(tmp_path, tiny_dir, capsys):
    from proxy.cli import main

    def check(**options) -> tuple[int, str]:
        path = tmp_path / "models.yaml"
        path.write_text(yaml.safe_dump(local_config(tmp_path, tiny_dir, **options)))
        with pytest.raises(SystemExit) as done:
            main(["check-config", "--strict", "--config", str(path)])
        out = capsys.readouterr()
        return done.value.code, out.out + out.err

    # A bad value: the route cannot load, as with any invalid option of this kind.
    code, text = check(cache={"high": {"threshold": 0.2}})
    assert code == 1 and "route 'local': invalid options: cache.high: unknown key(s) threshold" in text
    code, text = check(attention_backend="flsh")
    assert code == 1 and "not one of diffusers' backends" in text
    # An option this machine cannot run: the route is usable, the warning says what it serves without.
    code, text = check(attention_backend="flash", cache=True)
    assert code == 0 and "0 without a usable route" in text
    assert "warning: provider local: attention_backend flash" in text and "flash-attn" in text
