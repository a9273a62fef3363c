"""Shared fixtures: build a config, start the proxy on a real port, talk to it with the openai package."""

from __future__ import annotations

import copy

import pytest
from openai import AsyncOpenAI

from proxy import build_app, parse_config
from proxy.state.store_folder import FilesystemStore

QWEN_1K = {
    "default": "1024x1024",
    "tiers": {
        "1K": {
            "1:1": "1024x1024", "4:3": "1183x887", "3:4": "887x1182", "2:3": "836x1254",
            "3:2": "1254x836", "9:16": "768x1365", "16:9": "1365x768",
        }
    },
}


def base_config(tmp_path, **overrides) -> dict:
    """A config dict with the placeholder model; tests add providers and models to it."""
    cfg = {
        "store": {"path": str(tmp_path / "images"), "ttl_seconds": 3600},
        "providers": {"placeholder": {"kind": "placeholder"}},
        "size_tables": {"qwen-image": copy.deepcopy(QWEN_1K)},
        "models": {"qwen-image-placeholder": {"sizes": "qwen-image", "routes": ["placeholder"]}},
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture
async def start_proxy(aiohttp_server):
    """start_proxy(config_dict, env=None, api_key="test") -> (server, AsyncOpenAI client)."""
    clients: list[AsyncOpenAI] = []

    async def start(config: dict, env: dict | None = None, api_key: str = "test", providers=None):
        app = build_app(parse_config(config, env=env or {}), providers=providers)
        # TestServer turns on handler_cancellation, as `serve` does: a client that hangs up cancels its request.
        server = await aiohttp_server(app)
        client = AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=api_key, max_retries=0, timeout=60)
        clients.append(client)
        return server, client

    yield start
    # Closed in this test's loop: a client left to the garbage collector closes in a later test's loop
    # and logs "Event loop is closed" there, at ERROR.
    for client in clients:
        await client.close()


@pytest.fixture
async def store(tmp_path):
    """A started filesystem image store with a 60 s TTL."""
    s = FilesystemStore(tmp_path / "images", ttl_seconds=60)
    await s.start()
    yield s
    await s.close()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny random-weight pipeline, built once per session and loaded with the real from_pretrained."""
    from .local_helpers import tiny_pipeline_dir

    return tiny_pipeline_dir(tmp_path_factory.getbasetemp() / "shared-tiny")


@pytest.fixture(scope="session")
def tiny_edit_dir(tmp_path_factory):
    """The tiny random-weight edit pipeline, built once per session (real save_pretrained/from_pretrained)."""
    from .local_helpers import tiny_edit_pipeline_dir

    return tiny_edit_pipeline_dir(tmp_path_factory.getbasetemp() / "shared-tiny")


@pytest.fixture(scope="session")
def tiny21_dir(tmp_path_factory):
    """The tiny random-weight Qwen-Image-2.1 pipeline, built once per session (generations and edits)."""
    from .local_helpers import tiny21_pipeline_dir

    return tiny21_pipeline_dir(tmp_path_factory.getbasetemp() / "shared-tiny")


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny model gains nothing from threads, and on a busy 2-core box OpenMP threads spinning
    against other processes make each call several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
