"""The memory planner: parameter counts from config.json on the meta device (exact against the tiny models'
real weights; the published sizes of the 20B Qwen-Image, Qwen2.5-VL-7B and Qwen-Image-2.1's parts), the
placement table and auto's pick, `qwen-image-proxy plan`, the load error of a model that fits nowhere,
/ready's placement, and the text encoder's own placement and quantization."""

from __future__ import annotations

import json

import pytest
import yaml

pytest.importorskip("diffusers")

from local_backend import Engine, EngineConfig, EngineError, GenerationParams  # noqa: E402
from local_backend.memory import estimate  # noqa: E402
from local_backend.placement import GIB, parse_bytes, plan  # noqa: E402

from .conftest import base_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def real_bytes(module) -> tuple[int, int]:
    return (sum(p.numel() for p in module.parameters()),
            sum(p.numel() * p.element_size() for p in module.parameters()))


@pytest.mark.parametrize("which", ["tiny", "tiny-edit", "tiny-2.1"])
def test_estimate_equals_the_tiny_models_real_parameter_bytes(which, tiny_dir, tiny_edit_dir, tiny21_dir):
    folder = {"tiny": tiny_dir, "tiny-edit": tiny_edit_dir, "tiny-2.1": tiny21_dir}[which]
    config = EngineConfig(model=str(folder), device="cpu", dtype="float32", task="edit" if which == "tiny-edit" else "generate")
    e = estimate(config)
    with Engine(config) as engine:
        for name in ("transformer", "text_encoder", "vae"):
            params, nbytes = real_bytes(getattr(engine.pipe, name))
            assert (e.components[name].params, e.components[name].bytes) == (params, nbytes), name
    half = estimate(EngineConfig(model=str(folder), dtype="bfloat16"))
    assert half.components["transformer"].bytes * 2 == e.components["transformer"].bytes


def test_the_published_models_from_the_shipped_configs():
    e = estimate(EngineConfig(model="Qwen/Qwen-Image", max_pixels=1024 * 1024, max_batch=1))
    assert e.components["transformer"].params == pytest.approx(20.4e9, rel=0.02)
    assert e.components["text_encoder"].params == pytest.approx(8.3e9, rel=0.02)  # Qwen2.5-VL-7B
    assert e.components["vae"].params == pytest.approx(127e6, rel=0.02)
    assert e.components["transformer"].bytes == e.components["transformer"].params * 2  # bf16
    e21 = estimate(EngineConfig(model="Qwen/Qwen-Image-2.1"))
    assert e21.family == "qwen-image-2.1"
    assert e21.components["transformer"].params == pytest.approx(7.1e9, rel=0.02)  # 32 blocks, 32 x 128
    assert e21.components["text_encoder"].params == pytest.approx(8.77e9, rel=0.02)  # Qwen3-VL-8B
    q4 = estimate(EngineConfig(model="Qwen/Qwen-Image", transformer="qwen-image-Q4_K_M.gguf"))
    assert q4.components["transformer"].bytes == pytest.approx(20.4e9 * 4.5 / 8, rel=0.02)
    assert estimate(EngineConfig(model="tiny-2.1")).family == "qwen-image-2.1"  # the tiny names too
    with pytest.raises(EngineError, match="not one of the models whose configs ship"):
        estimate(EngineConfig(model="someone/unknown-model"))


def test_plan_picks_the_fastest_placement_that_fits():
    e = estimate(EngineConfig(model="Qwen/Qwen-Image", max_pixels=1024 * 1024, max_batch=1))
    assert plan(e, 80 * GIB).pick.placement == "none"  # an H100: everything resident
    assert plan(e, 48 * GIB).pick.placement == "model"
    small = plan(e, 24 * GIB)
    assert small.pick.offload in ("group", "sequential") and small.pick.gpu_peak <= 24 * GIB
    assert all(not r.fits for r in small.rows[:small.rows.index(small.pick)])  # nothing faster fits
    assert plan(e, 24 * GIB, text_encoder="cpu").pick.text_encoder == "cpu"
    nowhere = plan(e, 1 * GIB)
    assert nowhere.pick is None and nowhere.smallest_gpu > GIB
    assert plan(e, None).pick is None  # no GPU known: a table, no pick
    assert parse_bytes("24GiB") == 24 * GIB and parse_bytes("80 GB") == 80 * 10**9 and parse_bytes(5) == 5
    for bad in ("", "24 parsecs", "-1GiB", 0, True):
        with pytest.raises(ValueError):
            parse_bytes(bad)


@pytest.mark.parametrize("model", ["qwen-image", "qwen-image-2.1"])
def test_plan_cli_json_with_the_shipped_models_yaml(model, capsys):
    from proxy.cli import main

    main(["plan", "--config", "models.yaml", "--model", model, "--gpu-memory", "24GiB", "--json"])
    out = json.loads(capsys.readouterr().out)
    (route,) = out["routes"]
    assert route["gpu_memory"] == 24 * GIB
    pick = next(r for r in route["rows"] if r["placement"] == route["pick"])
    assert pick["fits"] and pick["gpu_peak"] <= 24 * GIB
    assert route["components"]["transformer"]["params"] == pytest.approx(
        20.43e9 if model == "qwen-image" else 7.12e9, rel=0.01)
    main(["plan", "--config", "models.yaml", "--model", model, "--gpu-memory", "24GiB"])
    text = capsys.readouterr().out
    assert f"auto picks: {route['pick']}" in text and "does not fit" in text


def test_offload_auto_on_a_cpu_route_is_a_config_error(tmp_path, tiny_dir, capsys):
    from proxy.cli import main

    cfg = base_config(tmp_path)
    cfg["providers"]["local"] = {"kind": "diffusers", "model": str(tiny_dir), "device": "cpu", "offload": "auto"}
    cfg["models"]["tiny"] = {"sizes": "qwen-image", "routes": ["local"]}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as done:
        main(["check-config", "--strict", "--config", str(path)])
    out = capsys.readouterr().out
    assert done.value.code == 1
    (line,) = [line for line in out.splitlines() if "tiny" in line]
    assert "offload: auto plans GPU memory, and this route runs on the CPU" in line


def test_plan_says_why_a_local_route_cannot_be_planned(tmp_path, tiny_dir, capsys):
    # A local route with invalid options was skipped in silence: "model tiny has no local (kind:
    # diffusers) route to plan", though it has one, and not a word of what is wrong with it.
    from proxy.cli import main

    cfg = base_config(tmp_path)
    cfg["providers"]["local"] = {"kind": "diffusers", "model": str(tiny_dir), "device": "cuda",
                                 "tiers": {"fast": {"steps": 0}}}
    cfg["models"]["tiny"] = {"sizes": "qwen-image", "routes": ["local"]}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as done:
        main(["plan", "--config", str(path), "--model", "tiny", "--gpu-memory", "24GiB"])
    assert done.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: model tiny: cannot plan route local: invalid options: tiers.fast.steps must be a positive integer"]


def test_a_model_that_fits_nowhere_is_a_load_error_naming_the_card(tiny_dir, monkeypatch):
    import torch

    # A GPU is claimed (nothing reaches it: the plan fails before any weight is read).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * GIB, 24 * GIB))
    engine = Engine(EngineConfig(model=str(tiny_dir), device="cuda", offload="auto", gpu_memory="100MiB",
                                 max_pixels=64 * 64, max_batch=1))
    with pytest.raises(EngineError) as e:
        engine.load()
    message = str(e.value)
    assert "does not fit in 0.1 GiB of GPU memory" in message and "needs a GPU with at least 1.0 GiB" in message


async def test_ready_shows_the_placement(start_proxy, tmp_path, tiny_dir):
    cfg = base_config(tmp_path)
    cfg["providers"]["local"] = {"kind": "diffusers", "model": str(tiny_dir), "device": "cpu",
                                 "load_in_background": False, "text_encoder": {"quantization": "int8wo"}}
    cfg["models"]["tiny"] = {"sizes": "qwen-image", "routes": ["local"]}
    server, _ = await start_proxy(cfg)
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(server.make_url("/ready")) as r:
        body = await r.json()
    (route,) = body["models"]["tiny"]["routes"]
    assert route["placement"] == {"offload": "none", "text_encoder": "cpu"}


def test_text_encoder_quantization_and_cpu_placement(tiny_dir):
    from local_backend.offload import run_on_cpu

    config = EngineConfig(model=str(tiny_dir), device="cpu", default_steps=2, text_encoder={"quantization": "int8wo"},
                          prompt_enhancement={"max_new_tokens": 16, "timeout": 60})
    with Engine(config) as engine:
        layer = engine.pipe.text_encoder.model.language_model.layers[0].mlp.up_proj
        assert "Int8" in type(layer.weight).__name__ or "Int8" in type(layer.weight.data).__name__
        before = engine.generate_sync(GenerationParams("a cat", 64, 64, seed=1)).images[0]
        # The CPU placement's hook (on a GPU box the rest of the pipeline is on cuda): same pixels, and
        # prompt enhancement generates where the encoder is.
        run_on_cpu(engine.pipe, engine.pipe.text_encoder)
        after = engine.generate_sync(GenerationParams("a cat", 64, 64, seed=1)).images[0]
        assert list(before.getdata()) == list(after.getdata())
        assert engine.generate_sync(GenerationParams("a grey heron", 64, 64, seed=1, prompt_enhancement=True)).revised_prompt
    for bad, message in [({"device": "tpu"}, "text_encoder.device must be cpu or cuda"),
                         ({"quantization": "int4"}, "text_encoder.quantization must be one of"),
                         ({"quantization": "int8", "device": "cpu"}, "runs on a GPU only"),
                         ({"where": "cpu"}, "unknown key")]:
        with pytest.raises(EngineError, match=message):
            Engine(EngineConfig(model=str(tiny_dir), text_encoder=bad))


def test_text_encoder_on_the_cpu_stays_out_of_model_offload(tiny_dir):
    """Model offload installs its hooks again after every call (diffusers' maybe_free_model_hooks); the
    text encoder kept on the CPU must stay out of them then too. Offloading "to" the CPU here: the hooks
    are the same as on a GPU box."""
    import torch
    from diffusers import QwenImagePipeline

    from local_backend.offload import place_with_cpu_encoder

    pipe = QwenImagePipeline.from_pretrained(str(tiny_dir))
    pipe.set_progress_bar_config(disable=True)

    def image():
        return pipe("a cat", height=64, width=64, num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    before = image()
    place_with_cpu_encoder(pipe, "model", "cpu", lambda stage: None)
    for _ in range(2):
        assert (image() == before).all()
        assert type(pipe.text_encoder._hf_hook).__name__ == "AlignDevicesHook"  # its own, not model offload's
        assert type(pipe.transformer._hf_hook).__name__ == "CpuOffload"


def test_plan_of_a_cpu_route_says_float32_and_no_gpu_placement(tmp_path, tiny_dir, capsys):
    # A route with device: cpu and no dtype loads in float32 (local_backend.loading); plan said bfloat16,
    # counted half the bytes, and printed GPU placements and "auto picks: none" for a route that never
    # touches a GPU.
    from proxy.cli import main

    cfg = base_config(tmp_path)
    cfg["providers"]["local"] = {"kind": "diffusers", "model": str(tiny_dir), "device": "cpu", "max_pixels": 64 * 64}
    cfg["models"]["tiny"] = {"sizes": "tiny", "routes": ["local"]}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["plan", "--config", str(path), "--model", "tiny", "--gpu-memory", "24GiB", "--json"])
    (route,) = json.loads(capsys.readouterr().out)["routes"]
    with Engine(EngineConfig(model=str(tiny_dir), device="cpu")) as engine:  # what really loads
        for name in ("transformer", "text_encoder", "vae"):
            params, nbytes = real_bytes(getattr(engine.pipe, name))
            assert route["components"][name] == {"params": params, "bytes": nbytes, "precision": "float32"}
    assert (route["device"], route["pick"], route["rows"]) == ("cpu", None, [])
    assert route["ram"] >= sum(c["bytes"] for c in route["components"].values())
    main(["plan", "--config", str(path), "--model", "tiny", "--gpu-memory", "24GiB"])
    text = capsys.readouterr().out
    assert "float32" in text and "bfloat16" not in text and "runs on the CPU" in text and "auto picks" not in text


def test_plan_of_a_cpu_route_is_for_the_largest_image_its_model_allows(tmp_path, tiny_dir, capsys):
    # Nothing is planned when a CPU route loads; planned at the engine's default max_pixels (4 x 2656x2656)
    # the shipped tiny model's plan said 20.2 GiB of RAM, where a generation at its largest size uses ~1 GiB.
    from proxy.cli import main
    from proxy.config import load_config

    cfg = base_config(tmp_path)
    cfg["providers"]["local"] = {"kind": "diffusers", "model": str(tiny_dir), "device": "cpu"}  # no max_pixels
    cfg["models"]["tiny"] = {"sizes": "tiny", "routes": ["local"]}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["plan", "--config", str(path), "--model", "tiny", "--json"])
    (route,) = json.loads(capsys.readouterr().out)["routes"]
    allowed = load_config(path).size_table("tiny").pixel_limit
    assert route["size"][0] * route["size"][1] <= allowed < (route["size"][0] + 16) * (route["size"][1] + 16)
    assert route["ram"] < 2 * 1024**3


@pytest.mark.parametrize("gpu_gib", [12, 68])
def test_plan_picks_what_the_load_picks(tmp_path, capsys, monkeypatch, gpu_gib):
    # plan planned for the model's size table (2048x2048) while the load plans for the route's own
    # max_pixels (here its default, 2656x2656): with 12 GiB plan said "auto picks: group" and the load
    # failed with "does not fit"; with 68 GiB plan said none and the load picked model offload.
    import torch

    from local_backend.offload import choose
    from proxy.cli import main

    cfg = base_config(tmp_path)
    options = {"kind": "diffusers", "model": "Qwen/Qwen-Image", "device": "cuda", "offload": "auto", "max_batch": 1}
    cfg["providers"]["local"] = options
    cfg.pop("size_tables")  # the built-in qwen-image table: up to 4 MP (2048x2048)
    cfg["models"]["big"] = {"sizes": "qwen-image", "routes": ["local"]}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["plan", "--config", str(path), "--model", "big", "--gpu-memory", f"{gpu_gib}GiB", "--json"])
    (route,) = json.loads(capsys.readouterr().out)["routes"]
    # The load's own plan, on a GPU with that much free (nothing reaches it: no weight is read).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (gpu_gib * GIB, 80 * GIB))
    config = EngineConfig(**{k: v for k, v in options.items() if k != "kind"})
    try:
        offload, te_device, placement = choose(config, config.model, "cuda", lambda stage: None)
    except EngineError as e:
        assert route["pick"] is None, f"plan picked {route['pick']}, the load failed: {e}"
    else:
        pick = next(r for r in route["rows"] if r["placement"] == route["pick"])
        assert (pick["offload"], pick["text_encoder"]) == (offload, te_device)
        assert round(pick["gpu_peak"] / GIB, 2) == placement["estimated_peak_gib"]


@pytest.mark.parametrize("name", ["Qwen/Qwen-Image-Edit-2511", "tiny-edit"])
def test_plan_of_an_edit_model_by_name_counts_its_reference_image(name, capsys):
    # `plan --model Qwen/Qwen-Image-Edit-2511` (a repo id, not a model of the config) planned it as a
    # text-to-image model: no reference image, fewer tokens than its edits have.
    from proxy.cli import main

    main(["plan", "--config", "models.yaml", "--model", name, "--gpu-memory", "24GiB", "--json"])
    (route,) = json.loads(capsys.readouterr().out)["routes"]
    edit = estimate(EngineConfig(model=name, device="cuda", task="edit"))
    assert route["references"] == 1
    assert route["activations"] == edit.activations
