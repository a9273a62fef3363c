"""What `models`, `check-config` and start-up say about a local route before loading anything."""

import pytest

from proxy.providers.local import LocalProvider


def preflight(**options):
    return LocalProvider("local", {"device": "cpu", **options}).preflight()


def test_tiny_needs_nothing_on_disk():
    assert preflight(model="tiny") is None


def test_missing_weights_are_named_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty Hugging Face cache
    reason = preflight(model="Qwen/Qwen-Image", local_files_only=True)
    assert "Qwen/Qwen-Image" in reason and "hf download" in reason


def test_weights_may_be_downloaded_when_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert preflight(model="Qwen/Qwen-Image", local_files_only=False) is None


@pytest.mark.parametrize("make_index", [False, True])
def test_a_folder_must_be_a_pipeline(tmp_path, make_index):
    if make_index:
        (tmp_path / "model_index.json").write_text("{}")
    reason = preflight(model=str(tmp_path), local_files_only=True)
    assert (reason is None) == make_index
    if not make_index:
        assert "model_index.json" in reason


def test_a_path_that_is_neither_folder_nor_repo():
    assert "neither" in preflight(model="/no/such/dir", local_files_only=True)


def test_cuda_asked_on_a_cpu_machine():
    import torch

    reason = LocalProvider("gpu", {"model": "tiny", "device": "cuda"}).preflight()
    assert (reason == "no CUDA GPU on this machine") != torch.cuda.is_available()


def test_unknown_option_is_reported():
    assert "unknown option" in LocalProvider("x", {"modle": "tiny"}).preflight()


@pytest.mark.parametrize("options, said", [
    # torch's RuntimeError at load (a traceback from `generate`), after check-config had passed it
    ({"model": "tiny", "device": "gpu"}, "invalid options: device must be cpu, cuda or cuda:N (or mps, xpu), not 'gpu'"),
    # a mistyped folder with downloads allowed: passed, then from_pretrained's ValueError at load
    ({"model": "/no/such/qwen-image", "local_files_only": False},
     "/no/such/qwen-image is neither a pipeline folder on this machine nor a Hugging Face repo id"),
    # the text encoder ran on the CPU with the rest while /ready said "text_encoder": "cuda"
    ({"model": "tiny", "text_encoder": {"device": "cuda"}},
     "invalid options: text_encoder.device cuda and device: cpu cannot both apply: this route runs on the CPU "
     "(drop text_encoder.device, or use device: cuda)"),
])
def test_check_config_refuses_local_options_that_cannot_work(tmp_path, monkeypatch, capsys, options, said):
    import yaml

    from proxy.cli import main

    from .conftest import base_config

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cfg = base_config(tmp_path)
    cfg["providers"]["local"] = {"kind": "diffusers", "device": "cpu", **options}
    cfg["models"]["tiny"] = {"sizes": "tiny", "routes": ["local"]}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as done:
        main(["check-config", "--strict", "--config", str(path)])
    assert done.value.code == 1
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "model tiny" in line]
    assert line.endswith(f"route 'local': {said}")
