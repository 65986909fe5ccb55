"""Reading YAML with limits, and printing bounded excerpts of what was read.

A search space is a small file written by hand. A 10 MB file or an alias bomb (a few lines of
nested ``&a [*a, *a, ...]`` that expand to billions of values) is a mistake or an attack, and
without limits it costs minutes and gigabytes before any message. So :func:`load_yaml` refuses
a file over ``max_bytes`` before reading it, counts alias references while composing, sizes
what the composed graph would expand to without expanding it, and calls an empty file an error.
:func:`excerpt` shows a value in at most ``limit`` characters, walking it with a budget, so that
an error message about a huge, deeply shared or self-referencing value is still one short line.

Example:
    >>> excerpt(list(range(1000)), limit=30)
    '[0, 1, 2, 3, 4, 5, 6, 7, 8,...'
    >>> loads_yaml("bits: [4, 8]")
    {'bits': [4, 8]}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from autoshrink.errors import AutoshrinkError

__all__ = ["MAX_ALIASES", "MAX_BYTES", "MAX_VALUES", "YamlError", "excerpt", "load_yaml", "loads_yaml"]

MAX_BYTES = 1_000_000  # a search space is a few KB; the bundled ones are < 3 KB
MAX_ALIASES = 100  # a hand-written file reuses an anchor a few times, not hundreds
# values (nodes) a document may expand to through its aliases: a large space is a few hundred;
# a "billion laughs" of 9 levels of 9 aliases (72 of them) is 9**9
MAX_VALUES = 100_000
EXCERPT_LIMIT = 80


class YamlError(AutoshrinkError, ValueError):
    """A YAML file that cannot be read: too large, an alias bomb, empty, not text, bad syntax."""


def _counting_loader(source: str, max_aliases: int, max_values: int) -> type[yaml.SafeLoader]:
    # the pure-Python SafeLoader: the C loader composes in C, where aliases cannot be counted
    class Loader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > max_aliases:
                    mark = self.peek_event().start_mark
                    raise YamlError(f"{source}:{mark.line + 1}:{mark.column + 1}: more than {max_aliases} "
                                    "YAML alias references (*name): is this an alias bomb? Write the values "
                                    "out, or reuse fewer anchors")
            return super().compose_node(parent, index)

        def compose_document(self):
            node = super().compose_document()
            # the graph shares aliased nodes, so it is small; what it expands to may not be
            if node is not None and _expanded_size(node, max_values, source) > max_values:
                raise YamlError(f"{source}: expands to more than {max_values} values through its aliases "
                                "(*name): is this an alias bomb? Write the values out, or reuse fewer anchors")
            return node

    return Loader


def _expanded_size(root: yaml.Node, limit: int, source: str) -> int:
    """How many nodes ``root`` stands for once every alias is expanded, counted up to just past
    ``limit``, in time proportional to the distinct nodes (each shared node is sized once)."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            mark = node.start_mark
            raise YamlError(f"{source}:{mark.line + 1}:{mark.column + 1}: an alias refers to the value that "
                            "contains it (a recursive structure): write the value out")
        open_.add(key)
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                break
        open_.discard(key)
        sizes[key] = total
        return total

    return size(root)


def loads_yaml(text: str, *, source: str = "<string>", max_aliases: int = MAX_ALIASES,
               max_values: int = MAX_VALUES) -> Any:
    """Parse one YAML document (safe types only), with limits on alias references and on the
    number of values the document expands to through them.

    Raises:
        YamlError: more than ``max_aliases`` alias references, an expansion past ``max_values``
            values or a recursive one, a syntax error (``source:line:col``), nesting deeper than
            Python can follow, or a document with nothing in it.
    """
    loader = _counting_loader(source, max_aliases, max_values)(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise YamlError(f"{source}{where}: YAML syntax error: {problem}") from None
    except RecursionError:
        raise YamlError(f"{source}: nested too deeply to read (thousands of levels): is it the right file?") from None
    finally:
        loader.dispose()
    if data is None:
        raise YamlError(f"{source} is empty: expected a YAML mapping")
    return data


def load_yaml(path: str | os.PathLike, *, max_bytes: int = MAX_BYTES, max_aliases: int = MAX_ALIASES,
              max_values: int = MAX_VALUES) -> Any:
    """Read a YAML file with a size limit (checked before reading), limits on aliases (their
    number, and how many values they expand to), and an error for an empty file.

    Raises:
        YamlError: naming the file: not found, not a file, over ``max_bytes`` (with its size),
            not UTF-8 text, empty, too many aliases or too large an expansion (an alias bomb),
            or a syntax error with line and column.

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "bomb.yaml"
        >>> _ = p.write_text("a: &a [x, x]\\n" + "".join(f"b{i}: &b{i} [*{'a' if i == 0 else f'b{i-1}'}] \\n"
        ...                  for i in range(200)))
        >>> load_yaml(p)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        autoshrink._yaml.YamlError: ...bomb.yaml:102:...: more than 100 YAML alias references (*name): ...
    """
    p = Path(path)
    if not p.exists():
        raise YamlError(f"{p}: file not found")
    if not p.is_file():
        raise YamlError(f"{p} is not a file")
    size = p.stat().st_size
    if size > max_bytes:
        raise YamlError(f"{p} is {_size(size)}, over the {_size(max_bytes)} limit for a YAML file: "
                        "is it the right file?")
    with open(p, "rb") as fh:
        raw = fh.read(max_bytes + 1)  # a file that grew since stat, or a special file
    if len(raw) > max_bytes:
        raise YamlError(f"{p} is over the {_size(max_bytes)} limit for a YAML file: is it the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlError(f"{p}: not a UTF-8 text (YAML) file (byte {exc.start})") from None
    return loads_yaml(text, source=str(p), max_aliases=max_aliases, max_values=max_values)


def _size(n: int) -> str:
    for unit, scale in (("MB", 1_000_000), ("KB", 1_000)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


class _Full(Exception):
    """The excerpt's budget is spent."""


def excerpt(value: Any, limit: int = EXCERPT_LIMIT) -> str:
    """A ``repr``-like text of ``value`` in at most ``limit`` characters (ending in ``...``
    when cut). Containers are walked piece by piece with a budget, so a huge, deeply shared
    (an expanded alias bomb) or self-referencing value costs about ``limit`` steps, not its size.

    Example:
        >>> excerpt({"bits": [4, 8], "name": "x" * 200}, limit=40)
        "{'bits': [4, 8], 'name': 'xxxxxxxxxx..."
        >>> a = []; a.append(a); excerpt(a, limit=12)
        '[[[[[[[[[...'
    """
    if limit < 4:
        raise ValueError(f"limit must be >= 4, got {limit}")
    pieces: list[str] = []
    room = limit + 1  # one more than fits tells that the text was cut

    def emit(text: str) -> None:
        nonlocal room
        text = text[:room]
        pieces.append(text)
        room -= len(text)
        if room <= 0:
            raise _Full

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            emit("{")
            for i, (k, x) in enumerate(v.items()):
                emit(", " if i else "")
                walk(k)
                emit(": ")
                walk(x)
            emit("}")
        elif isinstance(v, (list, tuple, set, frozenset)):
            if not v and isinstance(v, (set, frozenset)):
                emit(f"{type(v).__name__}()")
                return
            left, right = "[]" if isinstance(v, list) else "()" if isinstance(v, tuple) else "{}"
            emit(left)
            for i, x in enumerate(v):
                emit(", " if i else "")
                walk(x)
            emit("," + right if isinstance(v, tuple) and len(v) == 1 else right)
        elif isinstance(v, (str, bytes)):
            emit(repr(v[:room]))  # never the repr of a whole huge string
        else:
            try:
                text = repr(v)
            except Exception:  # noqa: BLE001 - a repr that fails (an int too long to print, ...)
                text = f"<{type(v).__name__}>"
            emit(text)

    try:
        walk(value)
    except (_Full, RecursionError):  # a budget this large nests deeper than Python recurses
        pass
    text = "".join(pieces)
    return text if len(text) <= limit else text[: limit - 3] + "..."
