"""Reading YAML for the config: PyYAML's safe loader, plus the checks it lacks.

PyYAML lets a later duplicate key silently replace an earlier one (a second `models:` section drops the
first), expands aliases without bound (a "billion laughs" file of a few hundred bytes takes gigabytes),
and reads a file of any size. Here each of those is a problem with its line, not a surprise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .strict import yaml_problem

# A config is kilobytes; this only stops a wrong path (a model's weights, /dev/zero) from filling memory.
MAX_BYTES = 16 * 1024 * 1024
# Values aliases may add beyond the file's own: anchors for shared blocks stay well under this.
MAX_ALIASED = 100_000
_MERGE = "tag:yaml.org,2002:merge"


class YamlProblem(Exception):
    """The text cannot be used; `lines` are `source: path: what is wrong` or `source is not valid YAML: ...`."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def read_text(path: Path) -> str:
    """A file's UTF-8 text, at most MAX_BYTES; OSError and UnicodeDecodeError as open() raises them,
    YamlProblem when it is larger."""
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise YamlProblem([f"{path} is larger than {MAX_BYTES // (1024 * 1024)} MiB: is it the config file?"])
    return data.decode("utf-8")


def load_yaml(text: str, source: str) -> Any:
    """safe_load, but a duplicate key or an alias bomb raises YamlProblem (every duplicate at once)."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            problems = _duplicates(loader, node, [], set())
            if problems:
                raise YamlProblem([f"{source}: {line}" for line in problems])
            own, expanded = _count(node, set(), {})
            if expanded - own > MAX_ALIASED:
                raise YamlProblem([f"{source}: aliases (*name) expand to {expanded:,} values, more than a config needs; "
                                   "is this an alias bomb?"])
            return loader.construct_document(node)
        except yaml.YAMLError as e:
            raise YamlProblem([f"{source} is not valid YAML: {yaml_problem(e)}"]) from None
        except RecursionError:  # PyYAML composes and constructs recursively
            raise YamlProblem([f"{source} is not valid YAML: nested too deeply"]) from None
    finally:
        loader.dispose()


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _duplicates(loader: yaml.SafeLoader, node: yaml.Node, path: list[str], seen: set[int]) -> list[str]:
    """`path: key given twice` for each mapping's repeated keys (a merge `<<: *base` may be overridden)."""
    if id(node) in seen:  # an alias: its node was checked where the anchor is
        return []
    seen.add(id(node))
    problems = []
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                continue
            key = loader.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else None
            where = ".".join([*path, str(key)])
            try:
                if key in first:
                    lines = (f"both on line {first[key]}" if first[key] == _line(key_node)
                             else f"lines {first[key]} and {_line(key_node)}")
                    problems.append(f"{where}: given twice ({lines}); YAML would keep only the last, so remove "
                                    "or rename one")
                elif key is not None:
                    first[key] = _line(key_node)
            except TypeError:  # unhashable: PyYAML says so when it constructs the mapping
                pass
            problems += _duplicates(loader, value_node, [*path, str(key)], seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += _duplicates(loader, item, [*path, str(i)], seen)
    return problems


def _count(node: yaml.Node, own: set[int], sizes: dict[int, int]) -> tuple[int, int]:
    """(distinct nodes in the document, nodes once every alias is expanded), in time linear in the former."""
    if id(node) in sizes:
        return len(own), sizes[id(node)]
    own.add(id(node))
    children: list[yaml.Node] = []
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    sizes[id(node)] = 1 + sum(_count(child, own, sizes)[1] for child in children)
    return len(own), sizes[id(node)]
