"""docs/configuration.md: written from the config dataclasses' field docstrings, complete, and current."""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from twotower_rec import config_reference
from twotower_rec.config import _CHOICES, HASHABLE_FEATURES, MOVED, Config, _coerce
from twotower_rec.config_reference import field_help, first_sentence, render, sections, type_name, yaml_value
from twotower_rec.errors import ConfigDocError

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "docs" / "configuration.md"


def _leaf_keys(obj, prefix: str = "") -> list[str]:
    """Every leaf option of a config object, walked on its own (not through the generator)."""
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += _leaf_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _options() -> dict:
    return {o.key: o for s in sections() for o in s.options}


def test_the_committed_reference_is_what_the_generator_writes():
    """Fails when a field is added or its help changed without `python -m twotower_rec.config_reference`."""
    assert REFERENCE.is_file(), f"{REFERENCE} is missing: run python -m twotower_rec.config_reference"
    assert REFERENCE.read_text(encoding="utf-8") == render(), (
        "docs/configuration.md is out of date: run python -m twotower_rec.config_reference and commit it")


def test_check_mode_passes_on_a_current_file_and_fails_with_a_diff_on_a_stale_one(tmp_path, capsys):
    current = tmp_path / "configuration.md"
    assert config_reference.main(["--out", str(current)]) == 0
    assert config_reference.main(["--out", str(current), "--check"]) == 0
    stale = current.read_text(encoding="utf-8").replace("| `train.batch_size` |", "| `train.batch_sise` |")
    current.write_text(stale, encoding="utf-8")
    capsys.readouterr()
    assert config_reference.main(["--out", str(current), "--check"]) == 1
    err = capsys.readouterr().err
    assert "-| `train.batch_sise` |" in err and "+| `train.batch_size` |" in err
    assert "is out of date: run `python -m twotower_rec.config_reference`" in err
    assert current.read_text(encoding="utf-8") == stale  # --check writes nothing
    assert config_reference.main(["--out", str(tmp_path / "absent.md"), "--check"]) == 1
    assert "is missing" in capsys.readouterr().err


def test_every_option_of_every_section_has_help_and_appears_once():
    options = _options()
    assert sorted(options) == sorted(_leaf_keys(Config()))
    for key, option in options.items():
        summary, _ = first_sentence(option.help)
        assert summary and option.help.strip(), key
    text = REFERENCE.read_text(encoding="utf-8")
    for key in options:
        assert text.count(f"| `{key}` |") == 1, key


def test_sections_come_in_config_order_with_their_class_docstrings():
    found = sections()
    names = [s.name for s in found]
    assert names[:3] == ["", "data", "data.synthetic"]
    top = [f.name for f in dataclasses.fields(Config)]
    assert [n for n in names if n and "." not in n] == [n for n in top if n in names]
    text = render()
    for section in found[1:]:
        assert f"## {section.name}\n" in text
        assert " ".join(section.cls.__doc__.split())[:40] in " ".join(text.split()), section.name


def test_the_help_names_every_choice_the_config_checks():
    from twotower_rec.config import _SHARDING_TYPES
    from twotower_rec.losses.pointwise import OBJECTIVES
    from twotower_rec.tasks import TASKS
    from twotower_rec.tasks.next_item import WINDOWS

    checked = {**_CHOICES, "task": tuple(TASKS), "pointwise.objective": OBJECTIVES, "next_item.windows": WINDOWS,
               "sharding.sharding_types": _SHARDING_TYPES, "data.hash_buckets": HASHABLE_FEATURES}
    options = _options()
    for key, choices in checked.items():
        summary, _ = first_sentence(options[key].help)
        for choice in choices:  # in the one-line help, so the table shows them
            assert re.search(rf"(?<![\w-]){re.escape(choice)}(?![\w-])", summary), (key, choice)


def test_defaults_are_spelt_as_yaml_that_reads_back_to_them():
    defaults = Config()
    options = _options()
    assert len(options) > 100
    for option in options.values():
        *path, name = option.key.split(".")
        owner = defaults
        for part in path:
            owner = getattr(owner, part)
        annotation = typing.get_type_hints(type(owner))[name]
        assert _coerce(yaml.safe_load(option.default), annotation, option.key) == getattr(owner, name), option.key


def test_types_and_defaults_are_written_as_a_reader_spells_them():
    assert type_name(int | None) == "int | null"
    assert type_name(dict[str, float]) == "dict[str, float]"
    assert type_name(list[int]) == "list[int]"
    assert [yaml_value(v) for v in (None, True, "", "|", 1 << 20, [128], {}, "runs/demo")] == [
        "null", "true", "''", "'|'", "1048576", "[128]", "{}", "runs/demo"]


def test_the_first_sentence_ends_at_a_full_stop_not_at_an_abbreviation():
    assert first_sentence("Logits (Yi et al. 2019) e.g. x. bag: more. Even more.") == (
        "Logits (Yi et al. 2019) e.g. x.", "bag: more. Even more.")
    assert first_sentence("a | b | causal. bag: pooled.") == ("a | b | causal.", "bag: pooled.")
    assert first_sentence("One sentence, 0.05 inside.") == ("One sentence, 0.05 inside.", "")


def test_table_cells_escape_pipes_and_tags():
    text = render()
    assert "| `data.genres_separator` | str | `'\\|'` |" in text
    assert "&lt;run_dir&gt;/data" not in text and "&lt;run_dir>/data" in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows and all(len(re.split(r"(?<!\\)\|", row)) in (4, 6) for row in rows)  # 2 or 4 cells each
    for old in MOVED:
        assert f"| `{old}` |" in text


# --- the generator refuses options it cannot document -----------------------------------


@dataclass
class _Documented:
    """A small section."""

    size: int = 3
    """How many. Further text."""
    names: list[str] = field(default_factory=lambda: ["a"])
    """Which ones."""
    limit: float | None = None
    """At most this."""


@dataclass
class _Tree:
    """The root."""

    top: str = "x"
    """A top-level option."""
    inner: _Documented = field(default_factory=_Documented)


@dataclass
class _Undocumented:
    """A section with a field that has no help."""

    size: int = 3
    """How many."""
    count: int = 0


@dataclass
class _Commented:
    """A section whose help is still a comment."""

    size: int = 3  # how many
    """How many."""


@dataclass
class _NoDocstring:
    size: int = 3
    """How many."""


def test_field_help_reads_each_field_docstring_from_the_source():
    assert field_help(_Documented) == {"size": "How many. Further text.", "names": "Which ones.",
                                       "limit": "At most this."}
    assert field_help(_Tree) == {"top": "A top-level option."}  # a section field needs none here


def test_a_small_tree_renders_one_table_per_section():
    text = render(_Tree)
    assert "| `top` | str | `x` | A top-level option. |" in text
    assert "## inner\n\nA small section." in text
    assert "| `inner.limit` | float \\| null | `null` | At most this. |" in text
    assert "| `inner.size` | int | `3` | How many. |" in text and "- `inner.size`: Further text." in text


@pytest.mark.parametrize("cls, message", [
    (_Undocumented, r"test_config_reference\.py line \d+: _Undocumented\.count has no help"),
    (_Commented, r"test_config_reference\.py line \d+: a # comment in _Commented"),
    (_NoDocstring, r"test_config_reference\.py line \d+: class _NoDocstring has no docstring"),
])
def test_the_generator_fails_loudly_on_an_option_without_help(cls, message):
    with pytest.raises(ConfigDocError, match=message):
        field_help(cls)

    root = dataclasses.make_dataclass("Root", [("bad", cls, field(default_factory=cls))],
                                      namespace={"__doc__": "Holds the bad section."})
    with pytest.raises(ConfigDocError, match=message):
        render(root)


def test_main_reports_an_option_without_help_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(config_reference, "render", lambda: field_help(_Undocumented))
    out = tmp_path / "configuration.md"
    assert config_reference.main(["--out", str(out)]) == 2
    assert "_Undocumented.count has no help" in capsys.readouterr().err
    assert not out.exists()
