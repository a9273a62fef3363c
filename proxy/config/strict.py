"""The strict-parsing machinery every section shares: unknown keys are errors, and each problem pydantic or
PyYAML finds becomes one `path: what is wrong` line, with "did you mean" for a misspelt key."""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable
from types import UnionType
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class Strict(BaseModel):
    """The base of every section: an unknown key is an error."""

    # inf and nan are no timeout or limit: nan compares false with everything, so a cap of nan is no cap.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _secret(path: list[str]) -> bool:
    """Whether the value at this path may be a secret: then an error never shows it."""
    return any(part.lower().endswith(("key", "keys", "secret", "token", "password")) for part in path)


def suggest(word: str, known: Iterable[str]) -> str:
    """'; did you mean 'x'?' for the nearest of `known`, else an empty string."""
    match = difflib.get_close_matches(str(word), [str(k) for k in known], n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


def _unknown_key(key: str, known: Iterable[str]) -> str:
    known = sorted(known)
    hint = suggest(key, known)
    return "unknown key" + (hint or (f"; known keys: {', '.join(known)}" if known else ""))


def _type_name(tp: Any) -> str | None:
    return getattr(tp, "__name__", None)


def _without_none(tp: Any) -> Any:
    if get_origin(tp) in (Union, UnionType):
        members = [m for m in get_args(tp) if m is not type(None)]
        if len(members) == 1:
            return members[0]
    return tp


def _walk(root: type[BaseModel], loc: tuple) -> tuple[list[str], type[BaseModel] | None, tuple | None]:
    """Follow a pydantic error location through the model's types.

    Returns the readable path (pydantic's union member tags dropped), the model whose field the last
    key would be (for "did you mean"), and the last union passed: (its path, the member tag, whether
    the error is about the whole value, i.e. nothing follows the tag).
    """
    path: list[str] = []
    holder: type[BaseModel] | None = None
    branch = None
    tp: Any = root
    parts = list(loc)
    while parts:
        tp = _without_none(tp)
        origin = get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            holder, part = tp, parts.pop(0)
            path.append(str(part))
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            tp = field.annotation if field else None
            continue
        holder = None
        if origin in (Union, UnionType):
            tag = parts.pop(0)
            branch = (tuple(path), tag, not parts)
            tp = next((m for m in get_args(tp) if _type_name(m) == tag), None)
            continue
        path.append(str(parts.pop(0)))
        tp = get_args(tp)[-1] if origin in (dict, list) else None
    return path, holder, branch


def _yaml_kind(value: Any) -> str:
    """What a parsed YAML value is, in YAML's words."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validation_problems(root: type[BaseModel], error: ValidationError, prefix: Iterable[str] = (),
                        extra_known: Iterable[str] = (), hidden: Collection[str] = ()) -> list[str]:
    """One 'path: message' line per problem pydantic found, with suggestions for unknown keys; a value
    holding one of `hidden` (a secret) is never shown."""
    entries = []
    for err in error.errors():
        path, holder, branch = _walk(root, err["loc"])
        path = [*prefix, *path]
        kind = err["type"]
        if kind == "extra_forbidden":
            known = set(holder.model_fields) if holder else set()
            if holder is root:
                known |= set(extra_known)
            msg = _unknown_key(path[-1], known)
        elif kind in ("model_type", "dict_type"):
            # pydantic says "... or instance of ServerConfig", a class the file's author never wrote; and a
            # section whose keys are all commented out (`server:` alone) is YAML's null, not a mistyped value.
            value = err.get("input")
            msg = ("is empty: give it its keys, or remove it" if value is None
                   else f"should be a mapping (key: value lines), not {_yaml_kind(value)}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if kind.endswith("_parsing"):  # "..., unable to parse string as an integer": the input says it
                msg = msg.split(", ")[0]
            value = err.get("input")
            shown = isinstance(value, str | int | float) and not _secret(path) and ", got " not in msg
            if shown and isinstance(value, str):
                shown = not any(secret and secret in value for secret in hidden)
            if kind not in ("missing", "value_error") and shown:
                msg += f", got {_show(value)}"
        # (the union's path, whether this complaint is only "not this member's type")
        union = (branch[0], branch[2] and _is_type_error(kind)) if branch else None
        entries.append((".".join(path) or "(top level)", msg, union))
    # A union (`sizes: name | table`) reports each member's complaint. Where one member got further than
    # "wrong type", keep only that one's; where none did, the first complaint is enough.
    deeper = {union[0] for *_, union in entries if union and not union[1]}
    lines, seen = [], set()
    for where, msg, union in entries:
        if union and union[1]:
            if union[0] in deeper or union[0] in seen:
                continue
            seen.add(union[0])
        lines.append(f"{where}: {msg}")
    return lines


def _is_type_error(kind: str) -> bool:
    return kind.endswith("_type") or kind.endswith("_parsing") or kind == "literal_error"


def yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: what and where."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem
