"""Several local providers in one process: loads, LoRAs and speed options never patch torch for the others.

The set-up of the bug report: one provider with LoRA speed tiers and base_loras (a Lightning provider),
several plain ones beside it, all loading at once in the background; then request LoRAs loaded by one
provider while others load; then a load that fails inside a library that leaves its patch behind.
Every provider must load (every start), and torch's process-wide functions must be the originals after.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from aiohttp.test_utils import TestServer  # noqa: E402
from openai import AsyncOpenAI  # noqa: E402

from proxy import build_app, parse_config  # noqa: E402
from proxy.app import GATEWAY  # noqa: E402

from .conftest import base_config  # noqa: E402
from .fake_openai_upstream import free_port  # noqa: E402
from .local_helpers import make_lora_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"default": "32x32", "max_side": 64, "tiers": {"0.001": {"1:1": "32x32"}}}
LORAS = 8  # the Lightning provider's: 6 tiers of one LoRA each and 2 base_loras
PLAIN = 4  # plain tiny providers beside it
LOAD_TIMEOUT = 240.0  # generous: a busy 2-core machine

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_dir):
    folder = tmp_path_factory.mktemp("concurrent-loras")
    for i in range(LORAS):
        make_lora_file(tiny_dir, folder / f"l{i}.safetensors", seed=i)
    return folder


def torch_globals() -> dict:
    """What loads patch process-wide, read raw (a staticmethod stays one): compare before and after."""
    import torch

    found = {f"Module.{name}": vars(torch.nn.Module)[name] for name in ("register_parameter", "register_buffer")}
    found["Parameter.__new__"] = vars(torch.nn.Parameter)["__new__"]
    found.update({f"init.{name}": getattr(torch.nn.init, name) for name in vars(torch.nn.init)
                  if name.endswith("_") and not name.startswith("_")})
    found.update({f"torch.{name}": getattr(torch, name) for name in ("empty", "zeros", "ones", "full", "linspace")})
    found["default dtype"] = torch.get_default_dtype()
    return found


def assert_untouched(before: dict) -> None:
    after = torch_globals()
    assert [k for k in before if after[k] is not before[k]] == []


@pytest.fixture
def pristine_torch():
    """The test's torch globals; put back afterwards whatever happens, so that a failure here (today's bug
    leaves torch patched) does not fail every later test in this process."""
    import torch

    before = torch_globals()
    yield before
    for key, value in before.items():
        owner, _, name = key.partition(".")
        if key == "default dtype":
            torch.set_default_dtype(value)
        elif owner == "Module":
            setattr(torch.nn.Module, name, value)
        elif owner == "Parameter":
            torch.nn.Parameter.__new__ = value
        elif owner == "init":
            setattr(torch.nn.init, name, value)
        else:
            setattr(torch, name, value)


def plain(tiny_dir, **options) -> dict:
    return {"kind": "diffusers", "model": str(tiny_dir), "device": "cpu", "default_steps": 2, **options}


def lightning(tiny_dir, lora_dir, **options) -> dict:
    """The Lightning provider: tier LoRAs and base_loras (loaded after its pipeline, beside the others)."""
    tiers = {f"t{i}": {"loras": [str(lora_dir / f"l{i}.safetensors")], "steps": 2, "cfg_scale": 1.0}
             for i in range(LORAS - 2)}
    base = [str(lora_dir / f"l{i}.safetensors") for i in range(LORAS - 2, LORAS)]
    return plain(tiny_dir, tiers=tiers, base_loras=base, **options)


def issue_config(tmp_path, tiny_dir, lora_dir) -> dict:
    cfg = base_config(tmp_path)
    cfg["size_tables"]["tiny"] = copy.deepcopy(SIZES)
    cfg["providers"] = {"lightning": lightning(tiny_dir, lora_dir)}
    cfg["providers"].update({f"plain{i}": plain(tiny_dir) for i in range(PLAIN)})
    cfg["models"] = {name: {"sizes": "tiny", "routes": [name]} for name in cfg["providers"]}
    return cfg


async def settled_ready(base_url: str, timeout: float = LOAD_TIMEOUT) -> dict:
    """/ready once no model is loading any more (ready or failed): its body."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(f"{base_url}/ready") as resp:
                    body = await resp.json()
                if all(m["state"] != "loading" for m in body["models"].values()):
                    return body
            except aiohttp.ClientConnectionError:
                pass
            assert time.monotonic() < deadline, "the models were still loading"
            await asyncio.sleep(0.1)


def failed_routes(ready: dict) -> dict:
    """model -> the reasons its routes give, for every model that is not ready."""
    return {name: [r.get("reason") for r in m["routes"]] for name, m in ready["models"].items()
            if m["state"] != "ready"}


async def serve_in_process(cfg: dict) -> TestServer:
    server = TestServer(build_app(parse_config(cfg, env={})))
    await server.start_server()
    return server


async def test_every_provider_loads_beside_one_that_loads_loras_every_start(tmp_path, tiny_dir, lora_dir,
                                                                            pristine_torch):
    """The bug report's set-up, started three times in this process: on the old code every start lost
    providers (TypeError: Parameter.__new__() got an unexpected keyword argument '_is_hf_initialized')."""
    cfg = issue_config(tmp_path, tiny_dir, lora_dir)
    for start in range(3):
        server = await serve_in_process(cfg)
        try:
            ready = await settled_ready(str(server.make_url("")).rstrip("/"))
            assert failed_routes(ready) == {}, f"start {start}"
            assert ready["status"] == "ready"
            assert_untouched(pristine_torch)
            client = AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="x", max_retries=0, timeout=120)
            try:
                cards = {m.id: m.model_extra["capabilities"] for m in (await client.models.list()).data}
                assert [t["name"] for t in cards["lightning"]["tiers"]] == ["base", *(f"t{i}" for i in range(6))]
                for model, extra in (("lightning", {"tier": "t1"}), (f"plain{PLAIN - 1}", {})):
                    result = await client.images.generate(model=model, prompt="a fox", response_format="b64_json",
                                                          extra_body={"seed": start, **extra})
                    assert result.data[0].b64_json
            finally:
                await client.close()
        finally:
            await server.close()


async def test_serve_loads_every_provider_beside_one_with_loras(tmp_path, tiny_dir, lora_dir):
    """The same set-up in a real `serve` process: /ready says every model is ready, the log has no failure."""
    port = free_port()
    cfg = issue_config(tmp_path, tiny_dir, lora_dir)
    cfg["server"] = {"port": port}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        ready = await settled_ready(f"http://127.0.0.1:{port}")
    finally:
        proc.terminate()
        log = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert failed_routes(ready) == {}, log[-3000:]
    assert "failed to load" not in log and "_is_hf_initialized" not in log


async def test_request_loras_load_while_other_providers_load(tmp_path, tiny_dir, lora_dir, pristine_torch):
    """One provider serves requests, each with a LoRA it has to load (cache of one), while three plain ones
    load in the background: every request and every load succeeds (the old code lost a provider to the
    request LoRAs' peft patch 3 runs in 3)."""
    cfg = base_config(tmp_path)
    cfg["size_tables"]["tiny"] = copy.deepcopy(SIZES)
    cfg["providers"] = {"serving": plain(tiny_dir, load_in_background=False, lora_dirs=[str(lora_dir)],
                                         lora_cache_size=1)}
    cfg["providers"].update({f"late{i}": plain(tiny_dir) for i in range(3)})
    cfg["models"] = {name: {"sizes": "tiny", "routes": [name]} for name in cfg["providers"]}
    server = await serve_in_process(cfg)  # "serving" has loaded; the others load now
    client = AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="x", max_retries=0, timeout=120)
    late = [server.app[GATEWAY].providers[f"late{i}"] for i in range(3)]
    deadline = time.monotonic() + LOAD_TIMEOUT
    try:
        done = requests = 0
        while requests < 4 or any(p.loading_stage is not None for p in late):
            assert time.monotonic() < deadline, "the other providers were still loading"
            loading = any(p.loading_stage is not None for p in late)
            result = await client.images.generate(
                model="serving", prompt="a fox", response_format="b64_json",
                extra_body={"seed": requests, "loras": [{"path": f"l{requests % LORAS}.safetensors", "scale": 1.0}]})
            assert result.data[0].b64_json
            requests += 1
            done += loading  # made while another provider was loading
        ready = await settled_ready(str(server.make_url("")).rstrip("/"))
        assert failed_routes(ready) == {}
        assert done >= 1, "no request ran while the others loaded: the test proved nothing"
        assert_untouched(pristine_torch)
    finally:
        await client.close()
        await server.close()


async def test_a_load_that_fails_leaving_a_patch_poisons_no_other_provider(tmp_path, tiny_dir, monkeypatch,
                                                                         caplog, pristine_torch):
    """A library that raises in the middle of its own patch (here: accelerate's init_empty_weights, entered
    and never left) fails that provider with its reason in /ready and the log; torch is put back, and the
    providers that load after it load."""
    import accelerate
    import diffusers

    real = diffusers.QwenImagePipeline.from_pretrained.__func__
    broken_dir = tmp_path / "broken"
    broken_dir.symlink_to(tiny_dir, target_is_directory=True)

    entered = []  # kept alive: a context manager collected unfinished would run its `finally`

    def from_pretrained(cls, source, **kwargs):
        if Path(source) == broken_dir:
            entered.append(accelerate.init_empty_weights())
            entered[-1].__enter__()  # left patched, as an interrupted library would
            raise RuntimeError("the weights are corrupt")
        return real(cls, source, **kwargs)

    monkeypatch.setattr(diffusers.QwenImagePipeline, "from_pretrained", classmethod(from_pretrained))
    cfg = base_config(tmp_path)
    cfg["size_tables"]["tiny"] = copy.deepcopy(SIZES)
    cfg["providers"] = {"broken": plain(broken_dir, load_in_background=False)}
    cfg["providers"].update({f"plain{i}": plain(tiny_dir) for i in range(2)})
    cfg["models"] = {name: {"sizes": "tiny", "routes": [name]} for name in cfg["providers"]}
    with caplog.at_level(logging.INFO):
        server = await serve_in_process(cfg)
        try:
            ready = await settled_ready(str(server.make_url("")).rstrip("/"))
        finally:
            await server.close()
    assert list(failed_routes(ready)) == ["broken"]
    assert_untouched(pristine_torch)
    reason = failed_routes(ready)["broken"][0]
    assert "failed to load" in reason and "the weights are corrupt" in reason
    assert any("provider broken: failed to load" in r.getMessage() and "the weights are corrupt" in r.getMessage()
               for r in caplog.records)
    assert any("put back what a failed model load left patched" in r.getMessage() for r in caplog.records)


def test_exclusive_puts_back_what_a_failed_step_left_patched(caplog, pristine_torch):
    import torch

    from local_backend.exclusive import exclusive

    def patched(*args, **kwargs):
        raise AssertionError("a leaked patch ran")

    with (caplog.at_level(logging.WARNING, "local_backend"), pytest.raises(RuntimeError, match="interrupted"),
          exclusive()):
        torch.nn.Module.register_parameter = patched
        torch.nn.Parameter.__new__ = patched
        torch.nn.init.kaiming_uniform_ = patched
        torch.linspace = patched
        torch.set_default_dtype(torch.float64)
        raise RuntimeError("interrupted")
    assert_untouched(pristine_torch)
    assert torch.nn.Linear(2, 2).weight.dtype == torch.float32  # Parameter, register_parameter and init work
    assert "register_parameter" in caplog.text and "torch default dtype" in caplog.text


def test_an_engines_attention_backend_is_its_own(tiny_dir):
    """diffusers' set_attention_backend also sets the process-wide default backend, which every other
    model without one of its own then used (a flash backend set by one provider reached another's CPU
    model). The engine keeps it on its own attention processors only."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    from local_backend import Engine, EngineConfig

    before = _AttentionBackendRegistry._active_backend
    engine = Engine(EngineConfig(model=str(tiny_dir), default_steps=2, attention_backend="_native_math"))
    engine.start()
    try:
        assert engine.warnings == [] and engine.accel.summary()["attention_backend"] == "_native_math"
        assert _AttentionBackendRegistry._active_backend == before
        used = {m.processor._attention_backend for m in engine.pipe.transformer.modules()
                if hasattr(getattr(m, "processor", None), "_attention_backend")}
        assert used == {AttentionBackendName("_native_math")}
    finally:
        engine.close()


async def test_providers_waiting_to_load_leave_the_threads_to_requests(tmp_path, tiny_dir, pristine_torch):
    """Six providers wait for a load in progress (held here): they hold none of the threads that requests
    use (the event loop's default executor, 4 threads here), so another model still answers meanwhile."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from local_backend.exclusive import exclusive

    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=4))
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with exclusive():
            holding.set()
            release.wait(LOAD_TIMEOUT)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert holding.wait(30)
    cfg = base_config(tmp_path)
    cfg["size_tables"]["tiny"] = copy.deepcopy(SIZES)
    cfg["providers"].update({f"plain{i}": plain(tiny_dir) for i in range(6)})
    cfg["models"].update({name: {"sizes": "tiny", "routes": [name]} for name in cfg["providers"] if name != "placeholder"})
    server = await serve_in_process(cfg)
    client = AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="x", max_retries=0, timeout=60)
    try:
        result = await client.images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024",
                                              response_format="b64_json")
        assert result.data[0].b64_json
        assert all(server.app[GATEWAY].providers[f"plain{i}"].loading_stage is not None for i in range(6))
        release.set()
        assert failed_routes(await settled_ready(str(server.make_url("")).rstrip("/"))) == {}
    finally:
        release.set()
        await client.close()
        await server.close()


def test_compiled_engines_of_one_process_share_the_recompile_budget(monkeypatch):
    """torch's graph limit is per code object, and every engine's transformer blocks run the same code:
    each engine's warm-up raises it by its own calls on top of the engines' before it. Measured with the
    old accounting: a 7th compiled tiny engine (2 graphs each) hit the limit and served uncompiled."""
    import torch._dynamo

    from local_backend import accel

    monkeypatch.setattr(accel, "_WARM_CALLS", 0)
    # torch's own patch: monkeypatch's undo deletes a setting from torch's config module
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=8):
        accel._allow_recompiles(3)  # the first engine: 3 warm-up calls
        first = torch._dynamo.config.recompile_limit
        assert first >= accel.GRAPHS_PER_CALL * 3
        accel._allow_recompiles(3)  # a second engine of the same model, in the same process
        assert torch._dynamo.config.recompile_limit == first + accel.GRAPHS_PER_CALL * 3
        assert torch._dynamo.config.accumulated_recompile_limit >= torch._dynamo.config.recompile_limit


def test_an_attention_backend_that_fails_its_check_call_leaves_the_default(tiny_dir, monkeypatch):
    """The check call at load fails with the configured backend: the engine serves with diffusers' default
    attention, reported (the old code had made the failing backend the process default: the fallback call
    used it too, and the load failed)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    from local_backend import Engine, EngineConfig, GenerationParams

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName("_native_math"), broken)
    engine = Engine(EngineConfig(model=str(tiny_dir), default_steps=2, attention_backend="_native_math"))
    engine.start()
    try:
        assert len(engine.warnings) == 1 and "attention_backend _native_math: a check call failed" in engine.warnings[0]
        assert engine.accel.summary()["attention_backend"] is None
        assert engine.generate_sync(GenerationParams("a fox", width=32, height=32, seed=1)).images[0].size == (32, 32)
    finally:
        engine.close()
