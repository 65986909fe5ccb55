"""YAML is read with limits (size, alias references, empty files), and a value in a message is
a bounded excerpt however large, shared or self-referencing it is."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from autoshrink._yaml import MAX_ALIASES, MAX_VALUES, YamlError, excerpt, load_yaml, loads_yaml
from autoshrink.errors import AutoshrinkError

# the classic "billion laughs": 9 levels of 9 references, 9**9 (387 million) leaves if expanded
BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
)


def test_an_alias_bomb_is_rejected_by_what_it_would_expand_to(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)  # 72 aliases: under the count limit
    with pytest.raises(YamlError, match=rf"^{path}: expands to more than {MAX_VALUES} values through its aliases "
                                        r"\(\*name\): is this an alias bomb\? Write the values out, or reuse "
                                        r"fewer anchors$") as info:
        load_yaml(path)
    assert isinstance(info.value, ValueError) and isinstance(info.value, AutoshrinkError)


def test_too_many_alias_references_are_rejected_while_composing(tmp_path):
    path = tmp_path / "many.yaml"
    path.write_text("a: &a 8\nb: [" + ", ".join(["*a"] * 150) + "]\n")
    with pytest.raises(YamlError, match=rf"^{path}:2:\d+: more than {MAX_ALIASES} YAML alias references "
                                        r"\(\*name\): is this an alias bomb\? Write the values out"):
        load_yaml(path)


def test_a_recursive_alias_and_deep_nesting_are_one_line(tmp_path):
    with pytest.raises(YamlError, match=r"^r\.yaml:1:\d+: an alias refers to the value that contains it "
                                        r"\(a recursive structure\): write the value out$"):
        loads_yaml("a: &a [1, *a]", source="r.yaml")
    with pytest.raises(YamlError, match=r"^d\.yaml: nested too deeply to read"):
        loads_yaml("[" * 100_000 + "]" * 100_000, source="d.yaml")


def test_an_alias_bomb_is_rejected_in_a_fresh_process_without_hanging(tmp_path):
    """The hang guard is the subprocess timeout; the assertion is the message."""
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    code = textwrap.dedent(f"""
        from autoshrink._yaml import YamlError, load_yaml, excerpt
        try:
            load_yaml({str(path)!r})
        except YamlError as exc:
            print(excerpt(str(exc), limit=300))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "expands to more than 100000 values through its aliases" in done.stdout


def test_a_few_aliases_are_fine_and_the_limit_can_be_set(tmp_path):
    text = "base: &b [4, 8]\nlayers:\n" + "".join(f"  - {{pattern: l{i}, bits: *b}}\n" for i in range(20))
    data = loads_yaml(text)
    assert data["layers"][19]["bits"] == [4, 8]
    with pytest.raises(YamlError, match=r"^x\.yaml:6:25: more than 3 YAML alias references"):
        loads_yaml(text, source="x.yaml", max_aliases=3)


def test_a_large_file_is_rejected_by_its_size_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "big.yaml"
    with open(path, "w") as fh:
        line = "- {pattern: layer, bits: [4, 8, 32], prune: [0.0, 0.25, 0.5]}\n"
        fh.write(line * (10_000_000 // len(line) + 1))
    assert path.stat().st_size > 10_000_000
    import builtins

    real_open = builtins.open

    def no_read(file, *args, **kwargs):  # the size is known from stat: the file is never opened
        assert str(file) != str(path), "the oversized file was opened"
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_read)
    with pytest.raises(YamlError, match=rf"^{path} is 10 MB, over the 1 MB limit for a YAML file: is it the right "
                                        r"file\?$"):
        load_yaml(path)


def test_the_size_limit_can_be_set(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("a: " + "x" * 2000 + "\n")
    with pytest.raises(YamlError, match=r"s\.yaml is 2 KB, over the 1.5 KB limit"):
        load_yaml(path, max_bytes=1500)
    assert load_yaml(path)["a"] == "x" * 2000


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "~\n"])
def test_an_empty_file_is_an_error(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(YamlError, match=rf"^{path} is empty: expected a YAML mapping$"):
        load_yaml(path)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("layers:\n  - pattern: [\n"), r"^{p}:3:1: YAML syntax error: "),
    (lambda p: p.write_bytes(b"a: \xff\xfe\n"), r"^{p}: not a UTF-8 text \(YAML\) file \(byte 3\)$"),
    (lambda p: p.mkdir(), r"^{p} is not a file$"),
    (lambda p: None, r"^{p}: file not found$"),
], ids=["syntax", "binary", "folder", "missing"])
def test_other_unreadable_files_are_one_line(tmp_path, make, message):
    path = tmp_path / "x.yaml"
    make(path)
    with pytest.raises(YamlError, match=message.format(p=path)) as info:
        load_yaml(path)
    assert "\n" not in str(info.value)


def test_unsafe_tags_are_refused():
    with pytest.raises(YamlError, match="YAML syntax error: could not determine a constructor"):
        loads_yaml("a: !!python/object/apply:os.system [echo hi]")


# -- excerpt --------------------------------------------------------------------------------------
def test_excerpt_of_small_values_is_their_repr():
    for value in [3, 0.5, "x", [4, 8], {"bits": [4, 8], "prune": 0.5}, (1,), (), set(), None, True, b"ab"]:
        assert excerpt(value) == repr(value)


@pytest.mark.parametrize("limit", [4, 10, 80, 200])
def test_excerpt_never_exceeds_its_limit(limit):
    values = ["x" * 10_000, list(range(100_000)), {str(i): [i] * 50 for i in range(1000)},
              [[["deep"] * 30] * 30] * 30, [10 ** 5000] * 50]
    for value in values:
        text = excerpt(value, limit=limit)
        assert len(text) <= limit and text.endswith("..."), (limit, text)


def test_excerpt_of_an_expanded_alias_bomb_and_a_cycle_is_quick_and_bounded():
    import yaml

    bomb = yaml.safe_load(BOMB)  # shared lists: cheap to build, 387 million leaves to walk
    assert excerpt(bomb, limit=60) == "{'a': ['lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol', '..."
    cycle = yaml.safe_load("a: &a [1, *a]")
    assert excerpt(cycle, limit=20) == "{'a': [1, [1, [1,..."
    assert excerpt(cycle, limit=100_000).startswith("{'a': [1, [1, [1")  # deeper than Python recurses


def test_excerpt_survives_a_failing_repr():
    class Bad:
        def __repr__(self):
            raise RuntimeError("no")

    assert excerpt([Bad()]) == "[<Bad>]"
    assert excerpt(10 ** 5000) == "<int>"  # too long for Python to print
    with pytest.raises(ValueError, match="limit must be >= 4, got 2"):
        excerpt(1, limit=2)
