"""Reading YAML config files: PyYAML's safe loader that refuses a key given twice, errors in one line naming the file,
the line and the column (:func:`read_yaml_mapping`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from data_pipeline.config import ConfigError

__all__ = ["UniqueKeyLoader", "read_yaml_mapping", "read_yaml_value"]


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (plain PyYAML silently keeps the last one, so a
    second ``optim:`` section would drop the first without a word). Keys merged in with ``<<:`` may be overridden."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._mapping_paths: dict[int, str] = {}
        _record_mapping_paths(node, "", self._mapping_paths)
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not key_node:
                where = getattr(self, "_mapping_paths", {}).get(id(node), "")
                raise _DuplicateKeyError(
                    f"key '{where}{key}' is given twice (lines {first.start_mark.line + 1} and "
                    f"{key_node.start_mark.line + 1}); keep one"
                )
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error in one line: where and what (its own text spans several lines, with a caret)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = getattr(e, "problem", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"{where} ({what})"


class _DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping names one key twice."""


def _record_mapping_paths(node: yaml.Node, prefix: str, out: dict[int, str]) -> None:
    """``out[id(mapping node)] = "section.sub."``: where each mapping sits, to name a duplicate key in full."""
    if id(node) in out:
        return  # an alias of a node seen already
    if isinstance(node, yaml.MappingNode):
        out[id(node)] = prefix
        for key_node, value_node in node.value:
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
            _record_mapping_paths(value_node, f"{prefix}{name}.", out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _record_mapping_paths(item, f"{prefix.rstrip('.')}[{i}].", out)


def read_yaml_mapping(path: str | Path, what: str = "") -> dict[str, Any]:
    """The top-level mapping of a YAML file (``{}`` for an empty one), read with :class:`UniqueKeyLoader`.

    Raises:
        ConfigError: Invalid YAML, a key given twice, or not a mapping (``what`` says of what, e.g.
            ``" of cluster keys"``).
    """
    try:
        data = yaml.load(Path(path).read_text(), Loader=UniqueKeyLoader) or {}
    except _DuplicateKeyError as e:
        raise ConfigError(f"{path}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML{_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping{what} at the top level")
    return data


def read_yaml_value(text: str, what: str) -> Any:
    """``text`` parsed as one YAML value (an override's ``value``), with :class:`UniqueKeyLoader`.

    Raises:
        ConfigError: Invalid YAML or a key given twice, naming ``what`` (e.g. ``"override 'optim.lr=x'"``).
    """
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except _DuplicateKeyError as e:
        raise ConfigError(f"{what}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: value is not valid YAML{_yaml_problem(e)}") from None
