"""The real `qwen-image-proxy` command: --version, config errors, a busy port, start and stop."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

TINY_TABLE = {"default": "64x64", "max_side": 256, "tiers": {"0.004": {"1:1": "64x64"}}}


def cli_env(tmp_path: Path) -> dict[str, str]:
    # The tiny pipeline is built into QWEN_IMAGE_PROXY_CACHE when (and only when) a model loads.
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
            "QWEN_IMAGE_PROXY_CACHE": str(tmp_path / "cache")}


def run_cli(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=tmp_path, env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


def write_config(tmp_path: Path, data: dict, name: str = "models.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def tiny_config(tmp_path: Path, **provider) -> dict:
    return {
        "store": {"path": str(tmp_path / "images")},
        "providers": {"tiny": {"kind": "diffusers", "model": "tiny", "device": "cpu", **provider},
                      "placeholder": {"kind": "placeholder"}},
        "size_tables": {"tiny": TINY_TABLE},
        "models": {"tiny": {"sizes": "tiny", "routes": ["tiny"]},
                   "placeholder": {"sizes": "tiny", "routes": ["placeholder"]}},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_version(tmp_path):
    out = run_cli(tmp_path, "--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"qwen-image-proxy {version('qwen-image-proxy')}"


def bad(tmp_path: Path, change) -> dict:
    data = tiny_config(tmp_path)
    change(data)
    return data


BAD_CONFIGS = {
    "unknown top-level key": (lambda d: d.update(modles={}), "modles: unknown key; did you mean 'models'?"),
    "unknown provider option": (lambda d: d["providers"]["tiny"].update(timout=5),
                                "providers.tiny.timout: unknown key; did you mean 'timeout'?"),
    "wrong option type": (lambda d: d["providers"]["tiny"].update(max_batch="many"),
                          "providers.tiny.max_batch: Input should be a valid integer, got 'many'"),
    "openai option type": (lambda d: d["providers"].update(up={"kind": "openai", "max_images_per_call": "many"}),
                           "providers.up.max_images_per_call: Input should be a valid integer, got 'many'"),
    "unknown kind": (lambda d: d["providers"]["placeholder"].update(kind="placeholdr"),
                     "providers.placeholder.kind: unknown provider kind 'placeholdr'; did you mean 'placeholder'?"),
    "wrong server type": (lambda d: d.update(server={"port": "abc"}),
                          "server.port: Input should be a valid integer, got 'abc'"),
    "missing default model": (lambda d: d.update(server={"default_model": "qwen-image"}),
                              "server.default_model: 'qwen-image' is not a configured model (models: placeholder, tiny)"),
    "unknown route key": (lambda d: d["models"]["tiny"].update(routes=[{"provider": "tiny", "timout": 3}]),
                          "models.tiny.routes.0.timout: unknown key; did you mean 'timeout'?"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_check_config_and_serve_reject_the_same_configs(tmp_path, case):
    change, problem = BAD_CONFIGS[case]
    path = write_config(tmp_path, bad(tmp_path, change))
    port = str(free_port())
    check = run_cli(tmp_path, "check-config", "--config", str(path))
    serve = run_cli(tmp_path, "serve", "--config", str(path), "--port", port)
    for out in (check, serve):
        assert out.returncode == 1
        assert "Traceback" not in out.stderr
        assert out.stderr.splitlines() == [f"error: {path}: {problem}"]
    assert not (tmp_path / "cache").exists()  # serve loaded nothing


def test_check_config_accepts_the_repo_models_yaml(tmp_path):
    out = run_cli(tmp_path, "check-config", "--config", str(ROOT / "models.yaml"))
    assert out.returncode == 0, out.stderr
    assert "12 models" in out.stdout


def test_check_config_names_a_bad_configured_lora(tmp_path):
    # Named LoRAs and base_loras were taken unchecked: a scale of "abc" passed check-config, and every
    # request naming the LoRA then failed with a TypeError (502, a traceback per retry); {scale: 2}
    # without a path read "LoraSpec.__init__() missing 1 required positional argument: 'path'".
    data = tiny_config(tmp_path, loras={"style": {"path": "a.safetensors", "scale": "abc"}})
    data["providers"]["nopath"] = {"kind": "diffusers", "model": "tiny", "device": "cpu",
                                   "loras": {"style": {"scale": 2}}}
    data["providers"]["base"] = {"kind": "diffusers", "model": "tiny", "device": "cpu",
                                 "base_loras": ["ok.safetensors", {"path": 7}]}
    data["models"]["tiny"]["routes"] = ["tiny", "nopath", "base"]
    out = run_cli(tmp_path, "check-config", "--strict", "--config", str(write_config(tmp_path, data)))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr + out.stdout
    assert "route 'tiny': invalid options: loras.style.scale must be a finite number, not 'abc'" in out.stdout
    assert "route 'nopath': invalid options: loras.style: a LoRA is a path or {path, scale}, not ['scale']" in out.stdout
    assert "route 'base': invalid options: base_loras[1].path must be a non-empty string" in out.stdout
    assert not (tmp_path / "cache").exists()


def test_check_config_reports_an_invalid_route_behind_a_usable_fallback(tmp_path):
    # Only a model without any usable route was reported: a malformed option on a local route that
    # falls back to another passed check-config --strict in silence (the route never serves).
    data = tiny_config(tmp_path, tiers={"fast": {"steps": 0}})
    data["models"]["tiny"]["routes"] = ["tiny", "placeholder"]
    path = write_config(tmp_path, data)
    out = run_cli(tmp_path, "check-config", "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == (
        "warning: provider tiny: invalid options: tiers.fast.steps must be a positive integer")
    assert run_cli(tmp_path, "check-config", "--strict", "--config", str(path)).returncode == 1


def test_unreadable_config_is_one_line(tmp_path):
    out = run_cli(tmp_path, "serve", "--config", str(tmp_path / "nope.yaml"))
    assert out.returncode == 1
    assert out.stderr.splitlines() == [f"error: cannot read config file {tmp_path / 'nope.yaml'}: "
                                       "No such file or directory"]


def test_busy_port_fails_at_once_before_any_model_loads(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path, load_in_background=False))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run_cli(tmp_path, "serve", "--config", str(path), "--host", "127.0.0.1", "--port", str(port),
                      "--log-level", "debug", timeout=30)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [f"error: cannot listen on 127.0.0.1:{port}: address already in use"]
    assert "Traceback" not in out.stderr and "loading" not in out.stderr
    assert not (tmp_path / "cache").exists()  # the tiny pipeline was never built: no model load


def test_address_that_cannot_be_bound(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path))
    # 192.0.2.1 (TEST-NET-1) is never an address of this machine.
    out = run_cli(tmp_path, "serve", "--config", str(path), "--host", "192.0.2.1", "--port", "8000")
    assert out.returncode == 1
    assert out.stderr.splitlines() == ["error: cannot listen on 192.0.2.1:8000: cannot assign requested address"]


def test_serve_answers_and_stops_on_sigint(tmp_path):
    data = tiny_config(tmp_path)
    data["models"].pop("tiny")
    data["providers"].pop("tiny")
    path = write_config(tmp_path, data)
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port", "0"],
                            cwd=tmp_path, env=cli_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for line in proc.stdout:
            if m := re.search(r"serving on (http://\S+)", line):
                url = m.group(1)
                break
        assert url, "the server never said where it listens"
        with urllib.request.urlopen(f"{url}/health", timeout=10) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        assert "Traceback" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def serving(tmp_path, data: dict) -> Iterator[list[str]]:
    """`serve` of config `data` (QIP_TEST_UNSET_KEY unset): the lines it printed before "serving on"; at the
    block's end it is stopped with SIGINT and must exit cleanly."""
    path = write_config(tmp_path, data)
    env = cli_env(tmp_path)
    env.pop("QIP_TEST_UNSET_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port", "0"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        before: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            if "serving on" in line:
                break
            before.append(line)
        yield before
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_says_at_start_which_route_it_skips_behind_a_fallback(tmp_path):
    # README's smallest config: without the key the upstream is skipped "(said once at start-up)" and the
    # placeholder answers; before, only a model with no usable route at all was reported, so a key set
    # under the wrong name left the placeholder answering in silence.
    data = {"providers": {"placeholder": {"kind": "placeholder"},
                          "upstream": {"kind": "openai", "base_url": "https://upstream.invalid/v1",
                                       "api_key": "${QIP_TEST_UNSET_KEY}"}},
            "models": {"qwen-image": {"routes": [{"provider": "upstream", "model": "qwen-image"}, "placeholder"]}}}
    with serving(tmp_path, data) as before:
        said = [line for line in before if "upstream" in line]
        assert len(said) == 1, before
        assert "model qwen-image: route 'upstream' skipped" in said[0]
        assert "no API key (set QIP_TEST_UNSET_KEY)" in said[0]


# A proxy-only install (`pip install .`, no torch, diffusers or transformers), as the install page offers.
WITHOUT_TORCH = ("import runpy, sys; sys.modules.update(dict.fromkeys(('torch', 'diffusers', 'transformers')));"
                 " runpy.run_module('proxy', run_name='__main__')")


def test_a_proxy_only_install_says_the_local_routes_need_the_local_extra(tmp_path):
    # Before, check-config, models and serve ended in a ModuleNotFoundError traceback on any config with a
    # diffusers route (the shipped models.yaml has several), instead of naming what to install.
    path = write_config(tmp_path, tiny_config(tmp_path))
    why = "route 'tiny': the local backend is not installed (torch); install with pip install '.[local]'"
    for args in (["check-config", "--config", str(path)], ["models", "--config", str(path)]):
        out = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *args], cwd=tmp_path, env=cli_env(tmp_path),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "Traceback" not in out.stderr
        said = out.stdout + out.stderr
        assert (why in said) if args[0] == "check-config" else (why.split(": ", 1)[1] in said), said


def test_a_model_still_loading_at_start_is_no_warning(tmp_path):
    # The shipped tiny models load in a second after `serve` starts: each was a WARNING "has no usable
    # route yet" on every first run, beside the real ones (a key or a GPU missing).
    data = tiny_config(tmp_path)
    data["providers"]["upstream"] = {"kind": "openai", "base_url": "https://upstream.invalid/v1",
                                     "api_key": "${QIP_TEST_UNSET_KEY}"}
    data["models"]["keyless"] = {"sizes": "tiny", "routes": [{"provider": "upstream", "model": "m"}]}
    with serving(tmp_path, data) as before:
        (loading,) = [line for line in before if "model tiny has no usable route yet" in line]
        assert " INFO " in loading and "loading the model" in loading
        (keyless,) = [line for line in before if "model keyless has no usable route yet" in line]
        assert " WARNING " in keyless and "no API key (set QIP_TEST_UNSET_KEY)" in keyless
