"""The config and the command line on an operator's bad day: YAML that PyYAML accepts but should not be
trusted (duplicate keys, alias bombs, files of any size), ${VAR} forms that were silently left as text,
secrets from the environment in errors, values that only failed once serving, and the CLI's exits (a
closed pipe, bad --workers, a signal while the workers start). Every answer is a line, never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config, parse_config

from .test_cli import cli_env, run_cli

ROOT = Path(__file__).resolve().parent.parent

BASE = """\
store: {path: STORE}
providers:
  placeholder: {kind: placeholder}
size_tables:
  t: {default: 64x64, max_side: 256, tiers: {"0.004": {"1:1": 64x64}}}
models:
  m: {sizes: t, routes: [placeholder]}
"""


def write(tmp_path: Path, text: str, name: str = "models.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).replace("STORE", str(tmp_path / "images")))
    return path


def errors_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path, env=env or {})
    return [line.removeprefix(f"{path}: ") for line in str(e.value).splitlines()]


def assert_clean_failure(out: subprocess.CompletedProcess) -> list[str]:
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    return out.stderr.splitlines()


# ---- YAML that safe_load takes without a word -----------------------------------------------------


def test_duplicate_keys_are_errors_with_their_lines_not_a_silent_last_wins(tmp_path):
    # A second `models:` section would silently drop the first; a second provider entry would replace it.
    path = write(tmp_path, BASE + """\
providers:
  placeholder: {kind: placeholder}
  up: {kind: openai, base_url: "https://a.example/v1"}
  up: {kind: openai, base_url: "https://b.example/v1"}
models:
  m2: {sizes: t, routes: [placeholder], sizes: t}
""")
    lines = assert_clean_failure(run_cli(tmp_path, "check-config", "--config", str(path)))
    tail = "YAML would keep only the last, so remove or rename one"
    assert lines == [f"error: {path}: providers: given twice (lines 2 and 8); {tail}",
                     f"error: {path}: providers.up: given twice (lines 10 and 11); {tail}",
                     f"error: {path}: models: given twice (lines 6 and 12); {tail}",
                     f"error: {path}: models.m2.sizes: given twice (both on line 13); {tail}"]


def test_duplicate_key_in_the_api_keys_file(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text("- {name: ci, key: sk-first-value, key: sk-second-value}\n")
    lines = errors_of(tmp_path, BASE + f"server: {{api_keys_file: {keys}}}\n")
    assert len(lines) == 1 and "0.key: given twice (both on line 1)" in lines[0]
    assert "sk-first-value" not in lines[0] and "sk-second-value" not in lines[0]


def test_anchors_and_merge_keys_still_work(tmp_path):
    # `<<: *base` then an override is YAML's own way to share a block: not a duplicate.
    path = write(tmp_path, """\
        store: {path: STORE}
        providers:
          a: &up {kind: openai, base_url: "https://up.example/v1", timeout: 30}
          b: {<<: *up, timeout: 5}
        size_tables:
          t: &table {default: 64x64, max_side: 256, tiers: {"0.004": {"1:1": 64x64}}}
        models:
          m: {sizes: t, routes: [a, b]}
          n: {sizes: *table, routes: [b]}
        """)
    config = load_config(path, env={})
    assert config.providers["a"].options["timeout"] == 30
    assert config.providers["b"].options == {"base_url": "https://up.example/v1", "timeout": 5}


def test_an_alias_bomb_is_refused_before_it_is_expanded(tmp_path):
    # 9**6 strings from a few hundred bytes (each level more multiplies by 9: gigabytes at 9**8).
    levels = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcde", "bcdef", strict=True):
        levels.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    lines = errors_of(tmp_path, "\n".join(levels) + "\nserver: {api_keys: *f}\n")
    assert len(lines) == 1
    assert lines[0].startswith("aliases (*name) expand to ") and lines[0].endswith("is this an alias bomb?")


def test_a_file_far_larger_than_a_config_is_not_read_whole(tmp_path):
    # A wrong --config (a model's weights, /dev/zero) must not fill memory first.
    path = tmp_path / "weights.safetensors"
    with open(path, "wb") as f:
        f.truncate(17 * 1024 * 1024)
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    assert str(e.value) == f"{path} is larger than 16 MiB: is it the config file?"


def test_nesting_too_deep_for_pyyaml_is_one_line(tmp_path):
    path = write(tmp_path, "server: " + "[" * 2000 + "]" * 2000 + "\n")
    out = run_cli(tmp_path, "check-config", "--config", str(path))
    assert assert_clean_failure(out) == [f"error: {path} is not valid YAML: nested too deeply"]


def test_an_empty_or_mistyped_section_says_so_without_naming_our_classes(tmp_path):
    # `passthrough:` with every key commented out is YAML's null: it was "Input should be a valid
    # dictionary or instance of PassthroughConfig", a class name the author of the file never wrote.
    path = write(tmp_path, BASE + "passthrough:\n  # base_url: https://api.openai.com/v1\nserver: [8000]\n")
    out = run_cli(tmp_path, "check-config", "--config", str(path))
    assert sorted(assert_clean_failure(out)) == [
        f"error: {path}: passthrough: is empty: give it its keys, or remove it",
        f"error: {path}: server: should be a mapping (key: value lines), not a list",
    ]


# ---- every problem at once, and values that used to fail only when serving ------------------------


def test_check_config_names_every_problem_in_every_section_at_once(tmp_path):
    # A bad server.port used to hide the provider and model problems until it was fixed.
    path = write(tmp_path, """\
        server: {port: abc}
        fetch: {allowed_networks: ["10.0.0.0/8", "banana"]}
        providers:
          placeholder: {kind: placeholder, bogus: 1}
          up: {kind: openai, timout: 3}
        size_tables:
          t: {default: 64x64, max_side: 256, tiers: {"0.004": {"1:1": 64x64}}}
        models:
          m: {sizes: t, routes: [nope]}
          m2: {sizes: nope, routes: [placeholder]}
        """)
    lines = assert_clean_failure(run_cli(tmp_path, "check-config", "--config", str(path)))
    assert lines == [f"error: {path}: {line}" for line in [
        "server.port: Input should be a valid integer, got 'abc'",
        "fetch.allowed_networks: 'banana' is not a network like '10.1.0.0/16' or 'fd00::/8'",
        "providers.placeholder.bogus: unknown key; known keys: kind, timeout",
        "providers.up.timout: unknown key; did you mean 'timeout'?",
        "models.m.routes.0: provider 'nope' is not defined under providers",
        "models.m2.sizes: size table 'nope' is not defined under size_tables nor built in (qwen-image, "
        "qwen-image-dashscope, tiny)",
    ]]


def test_a_broken_section_does_not_make_its_names_undefined():
    data = {"providers": {"placeholder": {"kind": "placeholder"}, "up": {}},  # up lacks its kind
            "size_tables": {"t": {"tiers": {"0.004": {"1:1": "64x64"}}, "default": "64x64"}},
            "models": {"m": {"sizes": "t", "routes": ["placeholder", "up"]}}}
    with pytest.raises(ConfigError) as e:
        parse_config(data, env={})
    assert str(e.value).splitlines() == ["config: providers.up.kind: Field required"]


@pytest.mark.parametrize(("section", "value", "line"), [
    # Each of these was accepted, then failed when serving (a traceback) or quietly meant "no limit".
    ("server", {"max_body_mb": float("inf")}, "server.max_body_mb: Input should be a finite number, got inf"),
    ("server", {"request_timeout": float("inf")},
     "server.request_timeout: Input should be a finite number, got inf"),
    ("store", {"max_download_mb": -1}, "store.max_download_mb: Input should be greater than 0, got -1"),
    ("store", {"max_download_mb": float("nan")}, "store.max_download_mb: Input should be a finite number, got nan"),
    ("store", {"max_download_mb": "nan"}, "store.max_download_mb: Input should be a finite number, got 'nan'"),
    ("fetch", {"allowed_networks": ["10.0.0.0/33"]},
     "fetch.allowed_networks: '10.0.0.0/33' is not a network like '10.1.0.0/16' or 'fd00::/8'"),
    # Without a scheme, every passed-through call failed as "could not be reached" (an invalid URL).
    ("passthrough", {"base_url": "api.openai.com/v1"},
     "passthrough.base_url: must be an http:// or https:// URL with a host, e.g. https://api.openai.com/v1"),
    ("server", {"public_base_url": "images.example.com"},
     "server.public_base_url: must be an http:// or https:// URL with a host, e.g. https://images.example.com"),
    # An unset ${VAR} in server.host read as "": every address of the machine.
    ("server", {"host": "${QIP_HOST}"},
     "server.host: empty: give an address (127.0.0.1: this machine only, 0.0.0.0: every address)"),
])
def test_values_that_cannot_serve_are_config_errors(section, value, line):
    with pytest.raises(ConfigError) as e:
        parse_config({section: value}, env={})
    assert str(e.value).splitlines() == [f"config: {line}"]


def test_bad_values_that_used_to_fail_at_start_up_fail_check_config_without_a_traceback(tmp_path):
    path = write(tmp_path, BASE + "server: {max_body_mb: .inf}\nfetch: {allowed_networks: [banana]}\n")
    lines = assert_clean_failure(run_cli(tmp_path, "serve", "--config", str(path), "--port", "0"))
    assert len(lines) == 2 and "server.max_body_mb" in lines[0] and "fetch.allowed_networks" in lines[1]


def test_credentials_in_a_url_are_refused_in_one_line_that_hides_the_password(tmp_path):
    """`user:password@` in a base_url made every call fail inside aiohttp (passthrough: a bare 500)."""
    path = write(tmp_path, BASE.replace("  placeholder: {kind: placeholder}\n", """\
  placeholder: {kind: placeholder}
  up: {kind: openai, base_url: "https://bob:${UP_PASS}@up.example/v1", api_key: k}
  fal: {kind: fal, api_key: k, base_url: "https://:hunter2-only@queue.example"}
""") + """\
passthrough: {base_url: "https://alice:hunter2-pass@pt.example/v1", api_key: k}
""")
    env = {**os.environ, "UP_PASS": "hunter2-env"}
    lines = assert_clean_failure(subprocess.run([sys.executable, "-m", "proxy", "check-config", "--config", str(path)],
                                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60))
    assert len(lines) == 3, lines
    for where in ("passthrough.base_url", "providers.up.base_url", "providers.fal.base_url"):
        line = next(line for line in lines if where in line)
        assert "must not hold credentials" in line and "api_key" in line
    assert "hunter2" not in "\n".join(lines) and "bob" not in "\n".join(lines)


# ---- ${VAR} ----------------------------------------------------------------------------------------


def test_nested_defaults_expand_as_in_a_shell():
    env = {"A": "https://from-a.example"}
    cfg = parse_config({"server": {"public_base_url": "${U:-${A}}", "host": "${U:-${U2:-127.0.0.2}}",
                                   "default_model": None},
                        "store": {"path": "$${literal}/${U:-x}"}}, env=env)
    assert cfg.server.public_base_url == "https://from-a.example"
    assert cfg.server.host == "127.0.0.2"
    assert cfg.store.path == "${literal}/x"
    assert cfg.unset_vars == {}


@pytest.mark.parametrize(("text", "shown"), [
    ("${QIP_PORT:=8000}", "'${QIP_PORT:=...'"),  # := is not our syntax: it used to stay as text
    ("${QIP_PORT-8000}", "'${QIP_PORT-8...'"),
    ("${QIP_PORT", "'${QIP_PORT...' is not ${VAR} or ${VAR:-default} (no closing '}')"),
    ("${ QIP_PORT }", "'${ Q...'"),
])
def test_a_reference_that_is_not_one_is_an_error_with_its_path(text, shown):
    with pytest.raises(ConfigError) as e:
        parse_config({"server": {"port": text}}, env={"QIP_PORT": "9000"})
    lines = str(e.value).splitlines()
    assert len(lines) == 1  # not also "port: Input should be a valid integer, got ''"
    assert lines[0].startswith(f"config: server.port: {shown}")
    assert lines[0].endswith("; write $${ for a literal ${")


def test_a_variable_in_a_key_is_an_error():
    with pytest.raises(ConfigError) as e:
        parse_config({"providers": {"${NAME}": {"kind": "placeholder"}}}, env={"NAME": "up"})
    assert "config: providers.${NAME}: ${VAR} is expanded in values only, not in keys" in str(e.value)


def test_unset_variables_outside_providers_are_warned_about(tmp_path):
    path = write(tmp_path, BASE.replace("STORE", '"${QIP_TEST_IMAGE_DIR}/img"'))
    out = run_cli(tmp_path, "check-config", "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert ("warning: store.path: ${QIP_TEST_IMAGE_DIR} not set, read as empty (give a default: "
            "${NAME:-value})") in out.stdout.splitlines()


# ---- secrets ---------------------------------------------------------------------------------------

SECRET = "sk-live-0123456789abcdef0123456789abcdef0123456789abcdef0123456789"


def test_a_secret_variable_in_the_wrong_field_is_never_shown(tmp_path):
    # A key variable used where a number goes: the message names the field, not the key (nor its start).
    path = write(tmp_path, BASE + """\
server: {default_model: "${QIP_API_KEY}"}
state: {socket_timeout: "${QIP_API_KEY}"}
routing: {retries: "x${QIP_API_KEY}"}
""")
    out = subprocess.run([sys.executable, "-m", "proxy", "check-config", "--config", str(path)], cwd=tmp_path,
                         env={**cli_env(tmp_path), "QIP_API_KEY": SECRET}, capture_output=True, text=True,
                         timeout=60)
    lines = assert_clean_failure(out)
    assert lines == [f"error: {path}: state.socket_timeout: Input should be a valid number",
                     f"error: {path}: routing.retries: Input should be a valid integer",
                     f"error: {path}: server.default_model: '[redacted]' is not a configured model (models: m)"]
    assert SECRET[:12] not in out.stdout + out.stderr


def test_a_key_written_into_a_malformed_reference_is_not_shown():
    with pytest.raises(ConfigError) as e:
        parse_config({"passthrough": {"base_url": "https://x.example", "api_key": f"${{OPENAI_KEY:={SECRET}}}"}},
                     env={})
    assert SECRET[:8] not in str(e.value)


# ---- the command line ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["models", "check-config"])
def test_a_reader_that_stops_early_gets_no_traceback(tmp_path, command):
    # `qwen-image-proxy models | head -1`: the pipe closes before the listing is written.
    path = write(tmp_path, BASE)
    proc = subprocess.Popen([sys.executable, "-m", "proxy", command, "--config", str(path)], cwd=tmp_path,
                            env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141  # as a shell reports a writer stopped by SIGPIPE
    assert err == ""


@pytest.mark.parametrize(("workers", "message"), [
    ("0", "argument --workers: 0 is not a number of processes (1-1024)"),
    ("-3", "argument --workers: -3 is not a number of processes (1-1024)"),  # used to exit 0, serving nothing
    ("many", "argument --workers: 'many' is not a number of processes"),
])
def test_bad_worker_counts_are_refused(tmp_path, workers, message):
    path = write(tmp_path, BASE)
    out = run_cli(tmp_path, "serve", "--config", str(path), "--port", "0", f"--workers={workers}")
    assert out.returncode == 2
    assert out.stderr.splitlines()[-1] == f"qwen-image-proxy serve: error: {message}"


def test_an_empty_config_path_says_so(tmp_path):
    out = run_cli(tmp_path, "check-config", "--config", "")
    assert assert_clean_failure(out) == ["error: --config is empty: give the path of a models.yaml"]
    write(tmp_path, BASE)  # QWEN_IMAGE_PROXY_CONFIG set but empty: the default, models.yaml
    out = subprocess.run([sys.executable, "-m", "proxy", "check-config"], cwd=tmp_path, capture_output=True,
                         text=True, env={**cli_env(tmp_path), "QWEN_IMAGE_PROXY_CONFIG": ""}, timeout=60)
    assert out.returncode == 0, out.stderr


def test_ctrl_c_while_a_command_works_is_a_quiet_exit_130(tmp_path):
    # Where the signal lands is a matter of timing; what matters is what reaches the terminal.
    script = ("import sys, proxy.cli as cli\n"
              "def interrupted(args): raise KeyboardInterrupt\n"
              "cli.cmd_check_config = interrupted\n"
              "cli.main(['check-config'])\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=cli_env(tmp_path), capture_output=True,
                         text=True, timeout=60)
    assert (out.returncode, out.stderr) == (130, "")


WORKERS_SCRIPT = """
import logging, os, signal, sys, time
from proxy.cli import run_workers

def serve_one(_label):
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # a worker that stops cleanly, as the server does
    with open(f"/proc/{os.getpid()}/stat") as stat, open(sys.argv[1], "a") as f:
        f.write(f"{os.getpid()} {stat.read().rsplit(')', 1)[1].split()[19]}\\n")  # pid, start time
    os.kill(os.getppid(), signal.SIGTERM)  # the stop arrives while the workers are still being started
    time.sleep(120)

run_workers(8, serve_one, logging.getLogger("test"))
"""


def test_a_stop_while_workers_start_stops_every_worker(tmp_path):
    pids_file = tmp_path / "pids"
    out = subprocess.run([sys.executable, "-c", WORKERS_SCRIPT, str(pids_file)], cwd=tmp_path,
                         env=cli_env(tmp_path), capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    workers = [line.split() for line in pids_file.read_text().splitlines()]
    assert workers
    for pid, started in workers:  # none was left behind, serving on its own
        try:
            with open(f"/proc/{pid}/stat") as stat:
                alive = stat.read().rsplit(")", 1)[1].split()[19] == started  # else another process got the pid
        except FileNotFoundError:
            continue
        if alive:
            os.kill(int(pid), signal.SIGKILL)
            pytest.fail(f"worker {pid} outlived its parent")


# ---- generate --------------------------------------------------------------------------------------


def test_generate_output_problems_are_found_before_the_model_loads_and_no_image_is_lost(tmp_path, tiny_dir):
    pytest.importorskip("diffusers")
    path = write(tmp_path, BASE.replace("providers:\n", "providers:\n  tiny: {kind: diffusers, model: TINY, "
                                        "device: cpu, default_steps: 1}\n").replace("TINY", str(tiny_dir))
                 + "  tiny: {sizes: t, routes: [tiny]}\n")
    common = [sys.executable, "-m", "proxy", "generate", "a red fox", "--config", str(path), "--model", "tiny"]
    env = {**cli_env(tmp_path), "OMP_NUM_THREADS": "1"}
    # Both at once: each pays for importing torch.
    no_folder = subprocess.Popen([*common, "-o", str(tmp_path / "missing" / "fox.png")], cwd=tmp_path, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    piped = subprocess.Popen([*common, "-n", "2", "-o", "fox.png"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    piped.stdout.close()  # `generate ... | head -c1`: the reader is gone before the first line
    _, err = no_folder.communicate(timeout=180)
    assert no_folder.returncode == 1
    assert err.splitlines() == [f"error: cannot write {tmp_path / 'missing' / 'fox.png'}: the folder "
                                f"{tmp_path / 'missing'} does not exist"]  # and nothing was loaded
    err = piped.stderr.read()
    assert piped.wait(timeout=180) == 141, err
    assert "Traceback" not in err
    assert (tmp_path / "fox-0.png").stat().st_size > 0 and (tmp_path / "fox-1.png").stat().st_size > 0


@pytest.mark.parametrize("value", [float("inf"), float("nan"), "inf"])
def test_a_provider_option_cannot_be_infinite(value):
    # A provider's `timeout: .inf` was accepted: no timeout at all on its calls.
    data = {"providers": {"up": {"kind": "openai", "base_url": "https://up.example/v1", "timeout": value}}}
    with pytest.raises(ConfigError) as e:
        parse_config(data, env={})
    assert "providers.up.timeout" in str(e.value) and "finite number" in str(e.value)


@pytest.mark.parametrize(("params", "hint"), [
    ("{release: 2024-05-01}", True),  # YAML's date: was sent upstream as the text "2024-05-01"
    ("{stamp: 2024-05-01 10:00:00}", True),
    ("{nested: {dates: [1, 2024-05-01]}}", True),
    ("{guidance: .nan}", False),
    ("{guidance: .inf}", False),
    ("{tags: !!set {a, b}}", False),
])
def test_route_params_must_be_json_values(tmp_path, params, hint):
    """A route's params go to the upstream as JSON with every call: what JSON cannot say is a config error
    naming the param, never an upstream call that fails (or sends a date as text) on every request."""
    text = BASE.replace("routes: [placeholder]", f"routes: [{{provider: placeholder, params: {params}}}]")
    lines = errors_of(tmp_path, text)
    name = params[1:].split(":")[0]
    assert len(lines) == 1 and "models.m.routes.0.params" in lines[0] and f"'{name}' must be a JSON value" in lines[0]
    assert ("quote it" in lines[0]) == hint


def test_route_params_that_are_json_are_kept(tmp_path):
    text = BASE.replace("routes: [placeholder]",
                        "routes: [{provider: placeholder, params: {release: '2024-05-01', steps: 8, x: [1, {a: null}]}}]")
    config = load_config(write(tmp_path, text), env={})
    assert config.models["m"].routes[0].params == {"release": "2024-05-01", "steps": 8, "x": [1, {"a": None}]}
