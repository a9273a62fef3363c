"""The command line as a user runs it: `python -m proxy generate | models | check-config` in a subprocess.

A subprocess pays for importing torch and diffusers (10+ s on a small CPU), so the two generating
runs start together, once per module, and the tests read their results.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 180


def env() -> dict[str, str]:
    """A clean environment: no LUMENFALL_API_KEY or QIP_* from the caller's shell, offline, 1 thread."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # two runs share the CPU; one thread each is fastest on a small box
    }


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "proxy", *args], cwd=cwd, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_all(commands: dict[str, list[str]], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """Run the commands in parallel; {name: finished process}."""
    procs = {name: start(args, cwd) for name, args in commands.items()}
    return {name: finish(proc) for name, proc in procs.items()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_dir, tiny_edit_dir) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    config = {
        "providers": {
            "tiny": {
                "kind": "diffusers",
                "model": str(tiny_dir),
                "device": "cpu",
                "default_steps": 2,
                # n images run as n pipeline calls of one: each image is exactly what a run of
                # n=1 with its seed makes (batched, it could differ by one level; see engine.py).
                "max_batch": 1,
            },
            "placeholder": {"kind": "placeholder"},
        },
        "size_tables": {
            "tiny": {"default": "64x64", "max_side": 256, "tiers": {"0.004": {"1:1": "64x64", "4:3": "80x64"}}}
        },
        "models": {
            "tiny": {"sizes": "tiny", "routes": ["tiny"]},
            "placeholder": {"sizes": "tiny", "routes": ["placeholder"]},
        },
    }
    (folder / "cli.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    bad = dict(config, providers={**config["providers"],
                                  "tiny": {**config["providers"]["tiny"], "no_such_option": 1}})
    (folder / "bad-option.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
    edit = dict(config, providers={"edit": {"kind": "diffusers", "model": str(tiny_edit_dir), "task": "edit",
                                            "device": "cpu"}},
                models={"edit": {"sizes": "tiny", "routes": ["edit"]}})
    (folder / "edit.yaml").write_text(yaml.safe_dump(edit, sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def generated(workdir) -> dict[str, subprocess.CompletedProcess]:
    common = ["generate", "a red fox", "-c", "cli.yaml", "--model", "tiny", "--size", "72x40", "--seed", "7",
              "--steps", "3"]
    return run_all({"one": [*common, "-o", "one.png"], "two": [*common, "-n", "2", "-o", "two.png"]}, workdir)


def image(path: Path) -> Image.Image:
    im = Image.open(path)
    im.load()
    return im


# ---- generate ---------------------------------------------------------------------------------------


def test_generate_writes_the_image(generated, workdir):
    run = generated["one"]
    assert run.returncode == 0, run.stderr
    im = image(workdir / "one.png")
    assert (im.format, im.size) == ("PNG", (72, 40))  # the asked size, though not a multiple of 16
    assert "seed 7" in run.stdout and "72x40" in run.stdout and "one.png" in run.stdout
    # Loading stages and a tqdm progress bar on stderr; stdout stays clean.
    assert "loading:" in run.stderr
    assert "denoising" in run.stderr and "3/3" in run.stderr
    assert "denoising" not in run.stdout
    assert "Traceback" not in run.stderr


def test_generate_n_and_same_seed(generated, workdir):
    run = generated["two"]
    assert run.returncode == 0, run.stderr
    assert not (workdir / "two.png").exists()
    first, second = workdir / "two-0.png", workdir / "two-1.png"
    assert image(first).size == image(second).size == (72, 40)
    assert "seed 7" in run.stdout and "seed 8" in run.stdout
    # The same seed in another run gives the identical file; the next seed another picture.
    assert first.read_bytes() == (workdir / "one.png").read_bytes()
    a = np.asarray(image(first)).astype(np.int16)
    b = np.asarray(image(second)).astype(np.int16)
    assert np.abs(a - b).max() > 10


def test_generate_errors(workdir):
    base = ["generate", "a red fox", "-c", "cli.yaml"]
    runs = run_all(
        {
            "unknown model": [*base, "--model", "nope", "-o", "x.png"],
            "not local": [*base, "--model", "placeholder", "-o", "x.png"],
            "extension": [*base, "--model", "tiny", "-o", "x.txt"],
            "size": [*base, "--model", "tiny", "-o", "x.png", "--size", "9999x9999"],
            "option": ["generate", "a red fox", "-c", "bad-option.yaml", "--model", "tiny", "-o", "x.png"],
            # It loaded the model first, then said "give 1 to 3 input images", which generate cannot give.
            "edit model": ["generate", "a red fox", "-c", "edit.yaml", "--model", "edit", "-o", "x.png"],
        },
        workdir,
    )
    expected = {
        "unknown model": "unknown model 'nope'; models: tiny, placeholder",
        "not local": "model 'placeholder' has no local (diffusers) route",
        "extension": "cannot tell the image format from 'x.txt'",
        "size": "Invalid size 9999x9999",
        "option": "no_such_option: unknown key",
        "edit model": "model 'edit' edits images and cannot generate from a prompt alone",
    }
    for name, message in expected.items():
        run = runs[name]
        assert run.returncode != 0, name
        assert message in run.stderr, (name, run.stderr)
        assert "Traceback" not in run.stderr, (name, run.stderr)
    assert not (workdir / "x.png").exists() and not (workdir / "x.txt").exists()
    assert "loading:" not in runs["edit model"].stderr  # refused before the load


# ---- models and check-config on the repo's models.yaml ---------------------------------------------


def test_models_and_check_config(tmp_path):
    config = str(ROOT / "models.yaml")
    runs = run_all(
        {
            "models": ["models", "-c", config],
            "check": ["check-config", "-c", config],
            "strict": ["check-config", "--strict", "-c", config],
        },
        tmp_path,
    )
    models = runs["models"]
    assert models.returncode == 0, models.stderr
    listed = [line.split()[0] for line in models.stdout.splitlines() if not line.startswith(" ")]
    assert listed[:3] == ["qwen-image", "qwen-image-placeholder", "qwen-image-tiny"]
    assert {"qwen-image-edit", "qwen-image-plus", "qwen-image-max"} <= set(listed)
    assert "qwen-image-tiny  (sizes: tiny, built in; default 64x64)" in models.stdout
    assert "qwen-image  (sizes: qwen-image, built in; default 1024x1024)" in models.stdout
    assert "-> lumenfall [openai] unavailable: no API key (set LUMENFALL_API_KEY)" in models.stdout
    assert "-> placeholder [placeholder] usable" in models.stdout
    # Local routes are checked without loading: the tiny one needs nothing, the GPU one a GPU.
    assert "-> local-tiny [diffusers] usable" in models.stdout
    assert "-> local-tiny-2.1 [diffusers] usable" in models.stdout
    if not torch.cuda.is_available():
        assert "-> local-gpu [diffusers] unavailable: no CUDA GPU on this machine" in models.stdout

    check, strict = runs["check"], runs["strict"]
    assert check.returncode == 0, check.stderr
    assert "12 models" in check.stdout
    assert strict.returncode == 1, strict.stdout + strict.stderr
    warnings = [line for line in strict.stdout.splitlines() if line.startswith("warning:")]
    qwen = [line for line in warnings if "model qwen-image has no usable route" in line]
    assert len(qwen) == 1 and "LUMENFALL_API_KEY" in qwen[0]
    assert not any("qwen-image-placeholder" in line or "qwen-image-tiny" in line for line in warnings)
    assert torch.cuda.is_available() or "no CUDA GPU" in qwen[0]
    for run in runs.values():
        assert "Traceback" not in run.stderr
    assert not (tmp_path / "var").exists()  # listing models writes nothing
