"""Reading a user's YAML file: its data, and where every key and list item stands in it.

Parsed with OmegaConf's own YAML loader (the same scalars, the same duplicate-key check), from
one composed node tree, so each key path (``base.train.lr``, ``search.sample.guidance[2]``)
maps to its line and column as written. Every way a file can be unreadable (missing, not UTF-8,
a syntax error, a duplicate key, a list or a scalar where a mapping is expected) is one
:class:`ConfigError` naming the file and the position.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_modules.config import ConfigError

try:  # omegaconf >= 2.4
    from omegaconf._yaml import get_yaml_loader
except ImportError:  # pragma: no cover - omegaconf 2.3
    from omegaconf._utils import get_yaml_loader


@dataclass
class Source:
    """A parsed YAML mapping and the (line, column) of each key path, both 1-based."""

    path: str
    data: dict
    positions: dict[str, tuple[int, int]] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)  # key path -> `key=value` as typed

    def position(self, key: str | None) -> tuple[int, int] | None:
        """Where ``key`` (or the nearest enclosing key that the file has) stands."""
        return next((self.positions[k] for k in _enclosing(key) if k in self.positions), None)

    def override(self, key: str | None) -> str | None:
        """The command-line override that set ``key`` (or a key above it), if one did."""
        return next((self.overrides[k] for k in _enclosing(key) if k in self.overrides), None)

    def where(self, key: str | None) -> str:
        """``file:line:column`` of ``key``; ``file (override k=v)`` when the command line set
        it; ``file`` when neither says."""
        typed = self.override(key)
        if typed is not None:
            return f"{self.path} (override {typed})"
        pos = self.position(key)
        return f"{self.path}:{pos[0]}:{pos[1]}" if pos else self.path

    def locate(self, err: ConfigError) -> ConfigError:
        """``err`` with its leading ``file:`` made ``file:line:column:`` (its key's place)."""
        message, prefix = str(err), f"{self.path}: "
        if err.key and message.startswith(prefix):
            message = f"{self.where(err.key)}: {message[len(prefix) :]}"
        return ConfigError(message, err.key)


def _enclosing(key: str | None) -> Iterator[str]:
    """``a.b[2]``, ``a.b``, ``a``: the key and every key above it."""
    while key:
        yield key
        cut = max(key.rfind("."), key.rfind("["))
        key = key[:cut] if cut > 0 else ""


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _walk(node: yaml.Node, path: str, out: dict[str, tuple[int, int]]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{path}.{key_node.value}" if path else str(key_node.value)
            out[key] = _mark(key_node)
            _walk(value_node, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = f"{path}[{i}]"
            out[key] = _mark(item)
            _walk(item, key, out)


def read_yaml(path: str | Path, what: str = "sweep file") -> Source:
    """The mapping in ``path``; a ConfigError (one line) for anything that is not one."""
    where = str(path)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{where}: no such {what}")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{where}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
            f"{err.start}); save the {what} as UTF-8"
        ) from None
    loader = get_yaml_loader()(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as err:
        mark, start = err.problem_mark or err.context_mark, err.context_mark
        at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        context = err.context or ""
        if context and start is not None and start is not mark:
            context += f" (from line {start.line + 1}, column {start.column + 1})"
        problem = ", ".join(str(p) for p in (context, err.problem) if p)
        raise ConfigError(f"{at}: YAML error: {problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: YAML error: {str(err).splitlines()[0]}") from None
    finally:
        loader.dispose()
    if data is None:
        raise ConfigError(f"{where}: the {what} is empty: expected a mapping with {_KEYS[what]}")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}:{_mark(node)[0]}: the {what} is a {type(data).__name__}, not a mapping: "
            f"expected {_KEYS[what]}"
        )
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{where}: key {bad[0]!r} is not a string")
    positions: dict[str, tuple[int, int]] = {}
    _walk(node, "", positions)
    return Source(where, data, positions)


_KEYS: dict[str, Any] = {
    "sweep file": "the keys name, base, search and tune",
    "config file": "run-config sections such as data, network, diffusion, train, sample, eval",
}
