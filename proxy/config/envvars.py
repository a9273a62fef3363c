"""${VAR} and ${VAR:-default} in the values of a parsed YAML tree.

As in a shell, the default may hold references of its own (`${A:-${B:-x}}`), an empty variable counts as
unset for `:-`, and `$${` is a literal `${`. Any other `${...}` (`${A:=x}`, `${ A }`, one never closed)
is a problem with its path: left as text it would become an address or a key without a word.
"""

from __future__ import annotations

import re
from typing import Any

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Variables whose values are never shown in an error, wherever they are used.
SECRET_NAME = re.compile(r"(?i)key|token|secret|password")


class Expansion:
    """What expanding one tree found: unset variables, malformed references, values to keep out of errors."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.missing: set[str] = set()
        self.missing_at: dict[str, list[str]] = {}  # path -> the unset variables its value names
        self.problems: list[str] = []
        self.problem_paths: set[str] = set()  # where a value was cut short: other complaints there are noise
        self.secrets: set[str] = set()

    def tree(self, value: Any, path: tuple[str, ...] = ()) -> Any:
        if isinstance(value, str):
            return self.text(value, path)
        if isinstance(value, list):
            return [self.tree(v, (*path, str(i))) for i, v in enumerate(value)]
        if isinstance(value, dict):
            for key in value:
                if isinstance(key, str) and "${" in key:
                    self.problems.append(f"{'.'.join((*path, key))}: ${{VAR}} is expanded in values only, "
                                         "not in keys")
            return {k: self.tree(v, (*path, str(k))) for k, v in value.items()}
        return value

    def text(self, text: str, path: tuple[str, ...]) -> str:
        out, i = [], 0
        while (start := text.find("$", i)) != -1:
            out.append(text[i:start])
            if text.startswith("$${", start):
                out.append("${")
                i = start + 3
            elif text.startswith("${", start):
                value, i = self._reference(text, start, path)
                out.append(value)
            else:
                out.append("$")
                i = start + 1
        out.append(text[i:])
        return "".join(out)

    def _reference(self, text: str, start: int, path: tuple[str, ...]) -> tuple[str, int]:
        """The value of the reference at text[start:] ("${..."), and where the text after it begins."""
        name = _NAME.match(text, start + 2)
        end = name.end() if name else start + 2
        if name and text.startswith("}", end):
            return self._value(name.group(), None, path), end + 1
        if name and text.startswith(":-", end):
            close = _closing(text, end + 2)
            if close is not None:
                return self._value(name.group(), text[end + 2:close], path), close + 1
        close = _closing(text, start + 2)
        # Only as far as the name and what follows it: a default may be a key written in by hand.
        shown = text[start:end + 2] + ("..." if close is None or close > end + 1 else "")
        unclosed = " (no closing '}')" if close is None else ""
        self.problem_paths.add(".".join(path))
        self.problems.append(f"{'.'.join(path) or '(top level)'}: '{shown}' is not ${{VAR}} or ${{VAR:-default}}"
                             f"{unclosed}; write $${{ for a literal ${{")
        return "", len(text) if close is None else close + 1

    def _value(self, name: str, default: str | None, path: tuple[str, ...]) -> str:
        if self.env.get(name):
            value = self.env[name]
            if SECRET_NAME.search(name):
                self.secrets.add(value)
            return value
        if default is None:
            self.missing.add(name)
            self.missing_at.setdefault(".".join(path), []).append(name)
            return ""
        return self.text(default, path)  # only a default in use is expanded (and may be missing)


def _closing(text: str, i: int) -> int | None:
    """The index of the `}` that closes a reference whose inside starts at i (nested ${...} skipped)."""
    depth = 0
    while i < len(text):
        if text.startswith("${", i):
            depth, i = depth + 1, i + 2
            continue
        if text[i] == "}":
            if depth == 0:
                return i
            depth -= 1
        i += 1
    return None


def expand_env(value: Any, env: dict[str, str], missing: set[str]) -> Any:
    """Expand ${VAR} / ${VAR:-default} in every string of a parsed YAML tree; unset names go to `missing`."""
    expansion = Expansion(env)
    out = expansion.tree(value)
    missing |= expansion.missing
    return out
