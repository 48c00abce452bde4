"""YAML read in bounds: recipe files, `train --config` and `--set` values are parsed with limits on their
size, nesting depth, aliases and the size they expand to, checked while the document is composed and
before any Python object is built. A "billion laughs" of nested anchors, or a value nested thousands deep,
is refused with exit 2 naming the source and the limit instead of exhausting memory or the stack."""

from __future__ import annotations

import yaml
from yaml.nodes import MappingNode, SequenceNode

from latentmill.errors import InputError

MAX_BYTES = 1_000_000  # a recipe is a few kilobytes
MAX_DEPTH = 32  # sections, lists of mappings, option values: a handful of levels
MAX_ALIASES = 100
MAX_NODES = 100_000  # scalars, lists and mappings once every alias is expanded


class _Exceeded(Exception):
    pass


class _BoundedLoader(yaml.SafeLoader):
    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _Exceeded(f"more than {MAX_ALIASES} aliases (*name)")
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Exceeded(f"nested deeper than {MAX_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_size(node, sizes: dict) -> int:
    """Nodes in `node` with every alias expanded (each shared node counted once per use), memoised."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = 1  # a node that refers to itself counts once where it recurs
    if isinstance(node, SequenceNode):
        total = 1 + sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, MappingNode):
        total = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    else:
        total = 1
    sizes[id(node)] = total
    return total


def load_yaml(text: str, source: str):
    """The YAML document in `text`, or an InputError naming `source` and the limit it breaks."""
    if len(text) > MAX_BYTES:
        raise InputError(
            f"{source}: {len(text):,} characters of YAML; a recipe is at most {MAX_BYTES:,}. Is it the right file?"
        )
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_NODES:
            raise _Exceeded(f"{size:,} values once its aliases are expanded (at most {MAX_NODES:,})")
        return loader.construct_document(node)
    except _Exceeded as err:
        raise InputError(
            f"{source}: the YAML has {err}; a recipe never needs that. Write the values out plainly."
        ) from None
    finally:
        loader.dispose()
