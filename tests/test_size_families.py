"""Built-in size tables: `sizes` is optional, a model gets its family's table by name, a config's own wins."""

from __future__ import annotations

import base64
import io
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from openai import OpenAI
from PIL import Image

from proxy.config import load_config, parse_config
from proxy.config.size_families import BUILTIN_TABLES, family_table

from .test_cli import cli_env, run_cli

ROOT = Path(__file__).resolve().parent.parent

# The config, as a newcomer writes it: no size tables anywhere.
SIX_LINES = """\
providers:
  placeholder: {kind: placeholder}
  lumenfall: {kind: openai, base_url: "https://api.lumenfall.ai/openai/v1", api_key: "${LUMENFALL_API_KEY}"}
models:
  qwen-image:
    routes: [{provider: lumenfall, model: qwen-image}, placeholder]
"""


@pytest.mark.parametrize("names, table", [
    (["qwen-image"], "qwen-image"),
    (["qwen-image-edit"], "qwen-image"),
    (["qwen-image-2.1"], "qwen-image"),
    (["Qwen/Qwen-Image-2512"], "qwen-image"),
    (["qwen-image-plus"], "qwen-image-dashscope"),
    (["qwen-image-max"], "qwen-image-dashscope"),
    (["qwen-image-edit-plus"], "qwen-image"),  # DashScope's edit model follows its input, not Plus's list
    (["qwen-image-tiny"], "tiny"),
    (["qwen-image-2.1-tiny"], "tiny"),
    (["my-model", "tiny-edit"], "tiny"),  # the model's own name says nothing: its engine's weights do
    (["my-images", "qwen-image-max"], "qwen-image-dashscope"),
    (["destiny"], "qwen-image"),  # "tiny" only as a whole word; nothing matches: Qwen-Image's table
])
def test_family_rules(names, table):
    assert family_table(names)[0] == table


def test_the_model_name_decides_before_its_routes():
    # A qwen-image model with a tiny fallback keeps Qwen-Image's sizes (tiny's 64 px would refuse 1024x1024).
    cfg = parse_config({"providers": {"t": {"kind": "diffusers", "model": "tiny", "device": "cpu"}},
                        "models": {"qwen-image": {"routes": ["t"]}, "fallback-only": {"routes": ["t"]}}}, env={})
    assert cfg.size_table_choice("qwen-image") == {"name": "qwen-image", "source": "built-in", "picked_by": "family"}
    assert cfg.size_table("fallback-only").default == (64, 64)


def test_every_shipped_model_names_the_table_its_family_would_pick():
    # So a model written without `sizes` gets what the shipped config spells out.
    cfg = load_config(ROOT / "models.yaml", env={})
    for name, model in cfg.models.items():
        assert isinstance(model.sizes, str), name
        without = parse_config({"providers": {k: {"kind": p.kind, **p.options} for k, p in cfg.providers.items()
                                              if k in {r.provider for r in model.routes}},
                                "models": {name: {"routes": [r.model_dump(exclude_defaults=True) for r in model.routes]}}},
                               env={})
        assert without.size_table_choice(name)["name"] == model.sizes, name
        assert cfg.size_table_choice(name) == {"name": model.sizes, "source": "built-in", "picked_by": "sizes"}


def test_a_configs_own_table_wins_over_the_built_in_one():
    mine = {"default": "512x512", "tiers": {"0.25": {"1:1": "512x512"}}}
    cfg = parse_config({"providers": {"p": {"kind": "placeholder"}}, "size_tables": {"qwen-image": mine},
                        "models": {"qwen-image": {"routes": ["p"]}, "named": {"sizes": "qwen-image", "routes": ["p"]},
                                   "inline": {"sizes": mine, "routes": ["p"]}}}, env={})
    for name in ("qwen-image", "named", "inline"):
        assert cfg.size_table(name).default == (512, 512), name
    assert cfg.size_table_choice("qwen-image")["source"] == "size_tables"
    assert cfg.size_table_choice("inline") == {"name": None, "source": "inline", "picked_by": "sizes"}


def test_built_in_tables_are_what_the_docs_say():
    cfg = parse_config({"providers": {"p": {"kind": "placeholder"}},
                        "models": {m: {"sizes": m, "routes": ["p"]} for m in BUILTIN_TABLES}}, env={})
    assert cfg.size_table("qwen-image").tiers["1K"]["16:9"] == (1365, 768)
    assert cfg.size_table("qwen-image").max_pixels == 4194304
    assert cfg.size_table("qwen-image-dashscope").default == (1328, 1328)
    assert cfg.size_table("tiny").max_side == 512


def test_six_line_config_through_the_cli(tmp_path):
    path = tmp_path / "six.yaml"
    path.write_text(SIX_LINES)
    check = run_cli(tmp_path, "check-config", "--strict", "-c", str(path))
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.splitlines() == [f"{path}: 2 providers, 1 models, 0 without a usable route"]
    models = run_cli(tmp_path, "models", "-c", str(path))
    assert models.returncode == 0, models.stderr
    assert models.stdout.splitlines()[0] == (
        "qwen-image  (sizes: qwen-image, built in, picked by the model's family; default 1024x1024)")


def test_six_line_config_serves_with_the_openai_client(tmp_path):
    path = tmp_path / "six.yaml"
    path.write_text(SIX_LINES)
    env = {k: v for k, v in cli_env(tmp_path).items() if k != "LUMENFALL_API_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "-c", str(path), "--port", "0"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for line in proc.stdout:
            if m := re.search(r"serving on (http://\S+)", line):
                url = m.group(1)
                break
        assert url, "the server never said where it listens"
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        result = client.images.generate(model="qwen-image", prompt="a lighthouse", size="16:9",
                                        response_format="b64_json")
        image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
        assert (image.format, image.size) == ("PNG", (1365, 768))
        with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as resp:
            card = yaml.safe_load(resp.read())["data"][0]  # JSON is YAML
        assert card["capabilities"]["size_table"] == {"name": "qwen-image", "source": "built-in",
                                                      "picked_by": "family"}
        assert [r["state"] for r in card["capabilities"]["routes"]][1] == "ready"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
