"""local_backend.tiers: speed tiers (LoRAs + scheduler + steps + cfg) on one set of weights, per request."""

from __future__ import annotations

import copy
import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import numpy as np  # noqa: E402
from openai import BadRequestError  # noqa: E402

from local_backend import Engine, EngineConfig, EngineError, GenerationParams, InvalidParamsError, LoraSpec  # noqa: E402
from local_backend.config import TierSpec  # noqa: E402
from local_backend.tiers import choose_tier, parse_tiers, tier_summary  # noqa: E402
from proxy.app import GATEWAY  # noqa: E402
from proxy.providers.local_convert import engine_config  # noqa: E402

from .conftest import base_config  # noqa: E402
from .local_helpers import make_lora_file, submit_while_held  # noqa: E402

SIZE = 32
STEPS = 3  # the engine's default_steps (base)
TIER_STEPS = 2
# Qwen-Image-Lightning's scheduler settings.
LIGHTNING = {
    "base_shift": math.log(3), "max_shift": math.log(3), "max_image_seq_len": 8192, "shift": 1.0,
    "shift_terminal": None, "time_shift_type": "exponential", "use_dynamic_shifting": True,
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_dir):
    folder = tmp_path_factory.mktemp("tier-loras")
    make_lora_file(tiny_dir, folder / "fast.safetensors", seed=7)
    return folder


def tiers(lora_dir) -> dict:
    return {
        # a Lightning-like tier: its LoRA, its scheduler, fewer steps, no CFG
        "fast": {"loras": [str(lora_dir / "fast.safetensors")], "scheduler": LIGHTNING,
                 "steps": TIER_STEPS, "cfg_scale": 1.0},
        # the same without the LoRA: what the LoRA does, apart from the rest
        "sched": TierSpec(scheduler=LIGHTNING, steps=TIER_STEPS, cfg_scale=1.0),
    }


@pytest.fixture(scope="module")
def engine(tiny_dir, lora_dir):
    eng = Engine(EngineConfig(model=str(tiny_dir), default_steps=STEPS, lora_dirs=[str(lora_dir)],
                              tiers=tiers(lora_dir), quality_tiers={"low": "fast", "high": "base"}))
    eng.start()
    yield eng
    eng.close()


def params(prompt="a red fox", **kw) -> GenerationParams:
    kw.setdefault("width", SIZE)
    kw.setdefault("height", SIZE)
    kw.setdefault("seed", 1)
    return GenerationParams(prompt, **kw)


def pixels(result, i=0) -> np.ndarray:
    return np.asarray(result.images[i]).astype(np.int16)


def max_diff(a, b) -> int:
    return int(np.abs(a - b).max())


# ----- the engine -----


def test_tier_lora_is_active_only_for_its_jobs_and_equals_a_request_lora(engine):
    base = pixels(engine.generate_sync(params()))
    original = engine.pipe.scheduler
    fast = engine.generate_sync(params(tier="fast"))
    assert fast.steps_run == TIER_STEPS
    sched = pixels(engine.generate_sync(params(tier="sched")))
    # The tier's LoRA changes the image (same seed, scheduler, steps and cfg without it)...
    assert max_diff(pixels(fast), sched) > 5
    # ...exactly as that LoRA given by the request would, with the same scheduler and steps.
    as_request = engine.generate_sync(params(tier="sched", loras=[LoraSpec("fast.safetensors")]))
    assert max_diff(pixels(fast), pixels(as_request)) == 0
    # The scheduler is the tier's during the call only: base is base again, bit for bit.
    assert engine.pipe.scheduler is original
    assert max_diff(pixels(engine.generate_sync(params())), base) == 0
    # The tier's scheduler really differs from base's (same steps, no LoRAs on either).
    plain = pixels(engine.generate_sync(params(num_inference_steps=TIER_STEPS, cfg_scale=1.0)))
    assert max_diff(plain, sched) > 0


def test_base_after_a_tier_call_equals_base_alone(tiny_dir, lora_dir, engine):
    fresh = Engine(EngineConfig(model=str(tiny_dir), default_steps=STEPS))
    fresh.start()
    try:
        alone = pixels(fresh.generate_sync(params("a base call", seed=5)))
    finally:
        fresh.close()
    engine.generate_sync(params("a tier call", tier="fast"))
    after = pixels(engine.generate_sync(params("a base call", seed=5, tier="base")))
    assert max_diff(alone, after) == 0


def test_jobs_of_different_tiers_do_not_share_a_call(engine):
    same = {"num_inference_steps": TIER_STEPS, "cfg_scale": 1.0}  # only the tier differs
    tier_names = [None, "sched", "fast", "sched", "base"]
    jobs = submit_while_held(engine, lambda: [engine.submit(params(f"p{i}", seed=10 + i, tier=t, **same))
                                              for i, t in enumerate(tier_names)])
    results = [job.future.result(30) for job in jobs]
    assert [r.batch_size for r in results] == [2, 2, 1, 2, 2]
    # A batched tier job gets the image it gets alone.
    solo = engine.generate_sync(params("p1", seed=11, tier="sched", **same))
    assert max_diff(pixels(results[1]), pixels(solo)) <= 1


def test_tier_steps_and_cfg_apply_unless_the_request_sets_them(engine):
    def planned(**kw):
        job = engine.submit(params(**kw))
        job.future.result(30)
        return job.steps, job.cfg

    assert planned() == (STEPS, engine.config.default_cfg_scale)
    assert planned(tier="fast") == (TIER_STEPS, 1.0)
    assert planned(tier="fast", num_inference_steps=4) == (4, 1.0)
    assert planned(tier="fast", cfg_scale=3.0) == (TIER_STEPS, 3.0)
    assert engine.generate_sync(params(tier="fast", num_inference_steps=4)).steps_run == 4


def test_unknown_tier_is_refused_at_submit(engine):
    for bad in ("nope", 3):
        with pytest.raises(InvalidParamsError) as err:
            engine.submit(params(tier=bad))
        assert err.value.param == "tier"


# ----- choosing a tier, the config -----


def speed_config(**kw) -> EngineConfig:
    return EngineConfig(
        default_steps=50,
        tiers={"lightning-8": {"steps": 8, "cfg_scale": 1.0}, "lightning-4": {"steps": 4, "cfg_scale": 1.0}},
        quality_tiers={"low": "lightning-4", "medium": "lightning-8", "high": "base", "auto": "base"},
        **kw,
    )


def test_quality_and_fal_fields_choose_the_tier():
    cfg = speed_config()
    assert choose_tier(cfg) is None
    assert [choose_tier(cfg, quality=q) for q in ("low", "medium", "high", "auto", "hd")] == [
        "lightning-4", "lightning-8", "base", "base", None]
    assert choose_tier(cfg, tier="lightning-8", quality="low", use_turbo=True) == "lightning-8"  # explicit wins
    assert choose_tier(cfg, use_turbo=True, quality="high") == "lightning-4"  # the fastest
    assert choose_tier(cfg, use_turbo="true") == "lightning-4"  # multipart text
    assert choose_tier(cfg, use_turbo=False, quality="medium") == "lightning-8"
    assert [choose_tier(cfg, acceleration=a) for a in ("none", "regular", "high")] == [
        None, "lightning-8", "lightning-4"]
    for field, value in (("acceleration", "max"), ("use_turbo", "yes")):
        with pytest.raises(InvalidParamsError) as err:
            choose_tier(cfg, **{field: value})
        assert err.value.param == field
    plain = EngineConfig()  # no tiers: everything but an explicit tier means base
    assert choose_tier(plain, use_turbo=True, acceleration="high", quality="low") is None
    assert tier_summary(cfg) == [
        {"name": "base", "steps": 50, "cfg_scale": 4.0},
        {"name": "lightning-8", "steps": 8, "cfg_scale": 1.0},
        {"name": "lightning-4", "steps": 4, "cfg_scale": 1.0},
    ]


@pytest.mark.parametrize("tiers, quality, message", [
    ({"base": {}}, {}, "built in"),
    ({"x": {"steps": 0}}, {}, "tiers.x.steps"),
    ({"x": {"cfg_scale": float("nan")}}, {}, "tiers.x.cfg_scale"),
    ({"x": {"speed": 1}}, {}, "unknown key"),
    ({"x": {"loras": [{"file": "a"}]}}, {}, "tiers.x.loras"),
    ({}, {"low": "lightning"}, "quality_tiers.low"),
])
def test_bad_tier_configs(tiers, quality, message):
    with pytest.raises(EngineError, match=message):
        parse_tiers(EngineConfig(tiers=tiers, quality_tiers=quality))
    with pytest.raises(ValueError, match=message):  # the proxy's provider options: a config error
        engine_config({"model": "tiny", "tiers": tiers, "quality_tiers": quality})


def test_unknown_scheduler_setting_fails_the_load(tiny_dir):
    engine = Engine(EngineConfig(model=str(tiny_dir), tiers={"x": {"scheduler": {"warp": 2}}}))
    with pytest.raises(EngineError, match="tiers.x.scheduler.*warp"):
        engine.load()
    engine.close()


# ----- through the proxy -----


async def test_tiers_through_the_proxy(start_proxy, tmp_path, tiny_dir, lora_dir):
    cfg = base_config(tmp_path)
    cfg["providers"]["local"] = {
        "kind": "diffusers", "model": str(tiny_dir), "device": "cpu", "default_steps": STEPS,
        "load_in_background": False, "tiers": {"fast": copy.deepcopy(tiers(lora_dir)["fast"])},
        "quality_tiers": {"low": "fast", "high": "base"},
    }
    cfg["size_tables"]["tiny"] = {"default": "64x64", "max_side": 256, "tiers": {"0.004": {"1:1": "64x64"}}}
    cfg["models"] = {"tiny": {"sizes": "tiny", "routes": ["local"]}}
    server, client = await start_proxy(cfg)
    provider = server.app[GATEWAY].providers["local"]
    assert provider.tiers == [{"name": "base", "steps": STEPS, "cfg_scale": 4.0},
                              {"name": "fast", "steps": TIER_STEPS, "cfg_scale": 1.0}]
    card = (await client.models.retrieve("tiny")).model_extra["capabilities"]
    assert card["tiers"] == provider.tiers  # what the playground's tier picker reads

    with pytest.raises(BadRequestError) as err:
        await client.images.generate(model="tiny", prompt="a cat", extra_body={"tier": "nope", "seed": 3})
    assert err.value.body["param"] == "tier"

    async def image(**kw):
        kw["extra_body"] = {"seed": 3, **kw.get("extra_body", {})}
        result = await client.images.generate(model="tiny", prompt="a cat", response_format="b64_json", **kw)
        return result.data[0].b64_json

    fast = await image(extra_body={"tier": "fast"})
    assert await image(quality="low") == fast
    assert await image(extra_body={"use_turbo": True}) == fast
    assert await image(extra_body={"acceleration": "high"}) == fast
    base = await image(quality="high")
    assert base != fast and await image() == base
