"""Docs that cannot rot: every code block of README.md and docs/ is checked, and the site builds strictly."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from markdown.extensions.toc import slugify  # the anchors MkDocs gives headings
from openai import OpenAI
from PIL import Image

from proxy.config import ConfigError, parse_config
from proxy.config import server as config_server

from .docs_snippets import (
    ROOT,
    Snippet,
    all_snippets,
    check_command,
    check_config,
    check_mark,
    commands,
    config_tree,
    snippets,
)
from .test_cli import cli_env

SNIPPETS = all_snippets()
by_lang = {lang: [s for s in SNIPPETS if s.lang == lang and not (s.mark or "").startswith("not checked")]
           for lang in ("yaml", "sh", "python", "json")}


def ids(group: list[Snippet]) -> list[str]:
    return [s.where for s in group]


def test_every_block_is_of_a_kind_the_checks_know():
    known = set(by_lang)
    for s in SNIPPETS:
        check_mark(s)
        # Other servers' configs and program output are shown, not checked; any other language must be
        # checked here or marked "not checked (why)".
        if s.lang not in known and s.lang and not (s.mark or "").startswith("not checked"):
            assert s.lang in {"nginx", "caddy", "text"}, f"{s.where}: a ```{s.lang} block: check it or mark it"
    assert len(by_lang["yaml"]) >= 8 and len(by_lang["python"]) >= 6 and len(by_lang["sh"]) >= 8


@pytest.fixture(autouse=True)
def _keys_file_stand_in(monkeypatch):
    # The docs name files users have (api_keys_file: /etc/qip/keys.yaml): a key list stands in for them.
    real = config_server.read_text

    def read_text(path):
        return real(path) if Path(path).exists() else "- a-key-from-the-file\n"

    monkeypatch.setattr(config_server, "read_text", read_text)


@pytest.mark.parametrize("snippet", by_lang["yaml"], ids=ids(by_lang["yaml"]))
def test_yaml_configs_load(snippet):
    check_config(snippet)


@pytest.mark.parametrize("snippet", by_lang["sh"], ids=ids(by_lang["sh"]))
def test_shell_commands_parse(snippet):
    for argv in commands(snippet.body):
        check_command(argv, snippet.where)


@pytest.mark.parametrize("snippet", by_lang["json"], ids=ids(by_lang["json"]))
def test_json_parses(snippet):
    json.loads(snippet.body)


@pytest.mark.parametrize("snippet", by_lang["python"], ids=ids(by_lang["python"]))
def test_python_compiles(snippet):
    compile(snippet.body, snippet.where, "exec")


# ---- a renamed key, a fragment, a broken link: the checks catch them -------------------------------------


def test_every_variable_of_the_shipped_models_yaml_is_in_the_table():
    """configuration.md says the shipped models.yaml "reads these variables": six were missing (the 2.1,
    2512 and edit-2511 weights, the usage ledger's path and database, the GPU's hourly cost)."""
    lines = [line for line in (ROOT / "models.yaml").read_text().splitlines() if not line.lstrip().startswith("#")]
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", "\n".join(lines)))
    assert "QIP_LOCAL_MODEL" in used
    page = (ROOT / "docs" / "configuration.md").read_text()
    table = page[page.index("## The shipped models.yaml"):]
    assert not {name for name in used if f"`{name}`" not in table}


def test_a_renamed_config_key_fails_the_check():
    # What happens when the code renames a key the docs still use (or the docs misspell one).
    every_section = next(s for s in by_lang["yaml"] if "request_timeout:" in s.body and s.path.name == "configuration.md")
    check_config(every_section)
    renamed = Snippet(every_section.path, every_section.line, "yaml",
                      every_section.body.replace("request_timeout:", "request_timeout_s:"), None)
    with pytest.raises(ConfigError, match=r"configuration.md:\d+: server.request_timeout_s: unknown key; "
                                          r"did you mean 'request_timeout'\?"):
        check_config(renamed)


def test_fragments_are_checked_under_their_key(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- snippet: fragment under providers: -->\n```yaml\nup:\n  kind: openai\n"
                    "  base_url: https://up.example/v1\n  timout: 3\n```\n")
    (snippet,) = snippets(page)
    assert config_tree(snippet) == {"providers": {"up": {"kind": "openai", "base_url": "https://up.example/v1",
                                                         "timout": 3}}}
    with pytest.raises(ConfigError, match="providers.up.timout: unknown key; did you mean 'timeout'"):
        parse_config(config_tree(snippet), env={})


def test_cli_lines_go_through_the_real_parser():
    check_command(["qwen-image-proxy", "serve", "-c", "x.yaml", "--port", "9000"], "here")
    with pytest.raises(AssertionError, match="refused by the CLI's parser"):
        check_command(["qwen-image-proxy", "serve", "--prot", "9000"], "here")
    with pytest.raises(AssertionError, match="no make target"):
        check_command(["make", "tset"], "here")
    with pytest.raises(AssertionError, match="no extra"):
        check_command(["pip", "install", ".[lcoal]"], "here")


def mkdocs_build(root: Path) -> subprocess.CompletedProcess:
    # Never --quiet: it drops the warnings that --strict turns into a failure.
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"),
                           "-d", str(root / "site-out")], capture_output=True, text=True, timeout=300)


def test_site_builds_strictly_and_a_broken_link_fails_it(tmp_path):
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    ok = mkdocs_build(tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    page = tmp_path / "docs" / "operations.md"
    page.write_text(page.read_text() + "\nSee [the scaling page](scaling.md).\n")
    broken = mkdocs_build(tmp_path)
    assert broken.returncode != 0
    assert "scaling.md" in broken.stdout + broken.stderr
    page.write_text(page.read_text().replace("(scaling.md)", "(scaling-out.md#no-such-heading)"))
    assert mkdocs_build(tmp_path).returncode != 0  # an anchor that is not there fails it too


# ---- running the examples against a real server ---------------------------------------------------------

# Every model the examples name, each served by the placeholder (sizes by family: -tiny gets the tiny table).
DOCS_SERVER = {
    "providers": {"placeholder": {"kind": "placeholder"}},
    "models": {name: {"routes": ["placeholder"], "max_input_images": 3}
               for name in ("qwen-image-placeholder", "qwen-image-tiny", "qwen-image", "qwen-image-edit")},
}


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs-server")
    (folder / "models.yaml").write_text(yaml.safe_dump({**DOCS_SERVER, "store": {"path": str(folder / "images")}}))
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "-c", "models.yaml", "--port", "0"],
                            cwd=folder, env=cli_env(folder), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        url = None
        for line in proc.stdout:
            if m := re.search(r"serving on (http://\S+)", line):
                url = m.group(1)
                break
        assert url, "the docs server never said where it listens"
        yield url, folder
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# Python blocks that use the openai client; the others are compile-only or run below.
CLIENT_SNIPPETS = [s for s in by_lang["python"] if "client." in s.body and not (s.mark or "").startswith("compile only")]


@pytest.mark.parametrize("snippet", CLIENT_SNIPPETS, ids=ids(CLIENT_SNIPPETS))
def test_openai_examples_run_against_the_proxy(snippet, docs_server, tmp_path, monkeypatch):
    url, _ = docs_server
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (96, 64), "white").save("room.png")  # the edit example's files
    Image.new("RGB", (48, 48), "red").save("sofa.png")
    Image.new("RGBA", (96, 64), (0, 0, 0, 0)).save("mask.png")
    code = snippet.body.replace("http://127.0.0.1:8000", url)
    namespace = {"client": OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)}
    exec(compile(code, snippet.where, "exec"), namespace)
    result = namespace.get("result")
    if result is not None and getattr(result, "data", None):  # answers with b64 images: real images
        for item in result.data:
            if item.b64_json:
                Image.open(io.BytesIO(base64.b64decode(item.b64_json))).verify()


def test_readme_example_makes_what_it_says(docs_server):
    url, _ = docs_server
    (quick,) = [s for s in CLIENT_SNIPPETS if s.path.name == "README.md"]
    namespace: dict = {}
    exec(compile(quick.body.replace("http://127.0.0.1:8000", url), quick.where, "exec"), namespace)
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in namespace["result"].data]
    assert [(im.format, im.size) for im in images] == [("WEBP", (1365, 768))] * 2


CURLS = [(s, argv) for s in by_lang["sh"] for argv in commands(s.body) if argv[0] == "curl"]


@pytest.mark.parametrize("snippet, argv", CURLS, ids=[s.where for s, _ in CURLS])
def test_curl_examples_are_answered(snippet, argv, docs_server):
    url, _ = docs_server
    call = check_command(argv, snippet.where)
    request = urllib.request.Request(url + call["path"], data=json.dumps(call["json"]).encode(),
                                     headers=call["headers"])
    with urllib.request.urlopen(request, timeout=120) as resp:
        status, body = resp.status, json.loads(resp.read())
    if status == 202:  # `Prefer: respond-async`: a background job, not images
        assert body["id"] and body["status"] in ("queued", "in_progress", "completed"), body
        return
    image = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    assert image.size == tuple(int(x) for x in call["json"]["size"].split("x"))


def test_the_aiohttp_mount_recipe_builds_its_app(docs_server, monkeypatch):
    _, folder = docs_server
    (recipe,) = [s for s in by_lang["python"] if "image_proxy_middleware" in s.body]
    monkeypatch.chdir(folder)  # its load_config("models.yaml")
    namespace = {"__name__": "docs_snippet"}  # not __main__: builds the app, does not run it
    exec(compile(recipe.body, recipe.where, "exec"), namespace)
    app = namespace["app"]
    assert len(app.middlewares) == 1
    assert any(r.resource.canonical == "/v1/chat/completions" for r in app.router.routes())


def test_readme_links_point_at_pages_and_headings():
    # The README is outside the site (mkdocs does not check it): its links are checked here.
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((?!https?:|#)([^)#\s]+)(?:#([^)\s]+))?\)", text)
    assert len(links) >= 20
    for target, anchor in links:
        path = ROOT / target
        assert path.exists(), f"README.md links to {target}, which is not there"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
            assert anchor in {slugify(h, "-") for h in headings}, f"README.md: no heading #{anchor} in {target}"


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_a_bare_make_lists_the_targets_and_installs_nothing(tmp_path):
    # Before, `make` alone ran the first target, `install`: a multi-minute torch download, and `make help`
    # was "No rule to make target". Every target a page names is in the list.
    venv = tmp_path / "venv"
    for args in ([], ["help"]):
        out = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), f"VENV={venv}", *args],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert not venv.exists()
        listed = set(re.findall(r"\bmake ([a-z][\w-]*)", out.stdout))
        assert {"run", "test", "lint", "docs", "install-test", "clean"} <= listed, out.stdout


def test_the_home_page_and_the_readme_list_every_page():
    # The site's home page had no row for usage-and-budgets.md: only the nav reached it.
    pages = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    index = (ROOT / "docs/index.md").read_text()
    readme = (ROOT / "README.md").read_text()
    assert [p for p in pages if p != "index.md" and f"({p})" not in index] == []
    assert [p for p in pages if p != "index.md" and f"(docs/{p})" not in readme] == []


def test_the_collector_header_rule_is_the_one_the_code_applies():
    # observability.md said every value of the collector's headers was a secret (it would cut a tenant name
    # out of every log line); only credential-named headers and long values are. Both pages name the words.
    from proxy.config import _SECRET_HEADER

    words = _SECRET_HEADER.pattern.split("|")
    phrase = ", ".join(words[:-1]) + " or " + words[-1]
    for page in ("security.md", "observability.md"):
        text = " ".join((ROOT / "docs" / page).read_text().split())
        assert phrase in text and "20 characters or more" in text, page
