"""The fenced code blocks of README.md and docs/, and the checks each kind of block goes through.

A block may be marked by an HTML comment on the line just before its opening fence:
  <!-- snippet: fragment under providers: -->   YAML that belongs under that (dotted) key of models.yaml
  <!-- snippet: compile only (why) -->           Python that is compiled but not run
  <!-- snippet: not checked (why) -->            anything the checks cannot run (another program's config)
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import yaml

from proxy.cli import build_parser
from proxy.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
_FENCE = re.compile(r"^(`{3,})(\S*)")
_MARK = re.compile(r"^<!--\s*snippet:\s*(.*?)\s*-->$")
_FRAGMENT = re.compile(r"^fragment under ([\w.-]+):$")
_REASONED = re.compile(r"^(not checked|compile only) \(.+\)$")

# Variables the documented configs name; values that pass their checks (a key needs 4+ characters).
DOC_ENV = {"QIP_CI_KEY": "ci-key-for-the-docs", "QIP_METRICS_KEY": "metrics-key-for-the-docs",
           "MOBILE_APP_KEY": "mobile-key-for-the-docs",
           "QIP_ADMIN_KEY": "admin-key-for-the-docs", "QIP_APP_KEY": "app-key-for-the-docs",
           "QIP_BATCH_KEY": "batch-key-for-the-docs", "QIP_WEB_KEY": "web-key-for-the-docs",
           "QIP_WEB_STAGING_KEY": "web-staging-key-for-the-docs"}
# Commands a shell block may run that the checks leave alone (a download, another program's CLI).
OTHER_COMMANDS = {"hf", "ray", "serve", "npm", "node"}


@dataclass
class Snippet:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    body: str
    mark: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def snippets(path: Path) -> list[Snippet]:
    lines = path.read_text(encoding="utf-8").split("\n")
    found, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(m.group(1)))
        mark = _MARK.match(lines[i - 1].strip()) if i else None
        found.append(Snippet(path, i + 1, m.group(2), "\n".join(lines[i + 1:end]) + "\n",
                             mark.group(1) if mark else None))
        i = end + 1
    return found


def all_snippets() -> list[Snippet]:
    return [s for path in doc_files() for s in snippets(path)]


def check_mark(snippet: Snippet) -> None:
    if snippet.mark is None or _FRAGMENT.match(snippet.mark) or _REASONED.match(snippet.mark):
        return
    raise AssertionError(f"{snippet.where}: unknown snippet mark '{snippet.mark}'")


# ---- YAML: models.yaml through the config loader -------------------------------------------------------


def config_tree(snippet: Snippet):
    """The snippet as a whole models.yaml tree: a fragment is put under its key."""
    tree = yaml.safe_load(snippet.body)
    m = _FRAGMENT.match(snippet.mark or "")
    if m:
        for key in reversed(m.group(1).split(".")):
            tree = {key: tree}
    return tree


def check_config(snippet: Snippet) -> None:
    """Raises ConfigError (every problem, one line each) when the loader refuses the snippet."""
    parse_config(config_tree(snippet), env=DOC_ENV, source=snippet.where)


# ---- shell: the CLI's own parser, make targets, pip extras, curl bodies ---------------------------------


def commands(body: str) -> list[list[str]]:
    """Each command line as argv, comments and `VAR=value` prefixes dropped, `\\` continuations joined."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
            argv = argv[1:]
        if argv:
            out.append(argv)
    return out


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*):", text, re.M))


def extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def check_command(argv: list[str], where: str) -> dict | None:
    """Checks one command; a curl call's request comes back ({method, path, json}) to be sent by the caller."""
    name = Path(argv[0]).name
    if name == "qwen-image-proxy":
        try:
            build_parser().parse_args(argv[1:])
        except SystemExit as e:  # argparse's way to refuse; --version and --help exit 0
            assert e.code == 0, f"{where}: `{shlex.join(argv)}` is refused by the CLI's parser"
    elif name == "make":
        unknown = {a for a in argv[1:] if "=" not in a} - make_targets()
        assert not unknown, f"{where}: `{shlex.join(argv)}`: no make target {sorted(unknown)}"
    elif name in ("pip", "python", "python3") or name.startswith("pip"):
        for arg in argv:
            if m := re.match(r"^-?e?\.\[([\w,-]+)\]$", arg):
                unknown = set(m.group(1).split(",")) - extras()
                assert not unknown, f"{where}: `{shlex.join(argv)}`: pyproject has no extra {sorted(unknown)}"
    elif name == "mkdocs":
        assert argv[1] in ("build", "serve"), f"{where}: `{shlex.join(argv)}`"
    elif name == "curl":
        url = next(a for a in argv if a.startswith("http"))
        data = argv[argv.index("-d") + 1] if "-d" in argv else None
        headers = dict(argv[i + 1].split(": ", 1) for i, a in enumerate(argv) if a == "-H")
        return {"path": re.sub(r"^https?://[^/]+", "", url), "json": json.loads(data) if data else None,
                "headers": headers}
    else:
        assert name in OTHER_COMMANDS, f"{where}: `{argv[0]}` is a command the docs test does not know"
    return None
