"""The configuration reference, ``docs/configuration.md``, written from the config dataclasses.

    python -m twotower_rec.config_reference            # (re)write docs/configuration.md
    python -m twotower_rec.config_reference --check    # exit 1, with a diff, when it is out of date

An option's help is the string literal on the line(s) right after its field (an attribute
docstring), in ``config.py`` or in a task's file under ``tasks/``::

    batch_size: int = 1024
    \"\"\"Examples a global batch (task=next_item: windows).\"\"\"

Its first sentence is the one-line help of the table; further sentences follow below the table.
The docstrings are read from the source with :mod:`ast` (Python keeps none of them at run
time); a field without one, or a ``#`` comment left in an options class, raises
:class:`~twotower_rec.errors.ConfigDocError`, so no option goes undocumented.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import io
import re
import sys
import tokenize
import types
import typing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from twotower_rec.errors import ConfigDocError

DEFAULT_OUT = Path("docs") / "configuration.md"
COMMAND = "python -m twotower_rec.config_reference"
# Words ending in a full stop that do not end a sentence.
_ABBREVIATIONS = ("e.g.", "i.e.", "al.", "vs.", "cf.", "etc.")


@dataclass
class Option:
    """One leaf option of the config.

    Args:
        key: its dotted name, e.g. ``train.batch_size``.
        type: its type as a reader spells it, e.g. ``int | null``.
        default: its default as YAML spells it, e.g. ``null``, ``[128]``.
        help: its whole attribute docstring, on one line.
    """

    key: str
    type: str
    default: str
    help: str


@dataclass
class Section:
    """One config section: the options of one dataclass (sub-sections are sections of their own).

    Args:
        name: its dotted name (``data.synthetic``); ``""`` for the top level.
        cls: its dataclass.
        options: its leaf options, in field order.
    """

    name: str
    cls: type
    options: list[Option]


def first_sentence(text: str) -> tuple[str, str]:
    """``text`` split after its first sentence: a full stop followed by white space, not one of
    an abbreviation (``e.g.``, ``et al.``).

    Args:
        text: one option's help, on one line.

    Returns:
        (first sentence, the rest); the rest is ``""`` for a one-sentence help.
    """
    for match in re.finditer(r"\.\s+", text):
        before = text[:match.start() + 1]
        if before.split()[-1].lstrip("(\"'[") not in _ABBREVIATIONS:
            return before.strip(), text[match.end():].strip()
    return text.strip(), ""


def type_name(annotation: Any) -> str:
    """A field's type as the reference shows it: ``int``, ``list[int]``, ``dict[str, float]``,
    ``int | null``.

    Args:
        annotation: the evaluated annotation (``typing.get_type_hints``).
    """
    if annotation is type(None):
        return "null"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return annotation.__name__


def yaml_value(value: Any) -> str:
    """``value`` as YAML spells it on one line: ``null``, ``true``, ``''``, ``[128]``, ``{}``.

    Args:
        value: a default value (a scalar, a list or a mapping).
    """
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, sort_keys=False).strip()
    return text[:-len("\n...")] if text.endswith("\n...") else text


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


@lru_cache(maxsize=None)
def _module_source(path: str) -> tuple[str, ast.Module, frozenset[int]]:
    """A source file's text, its syntax tree and the lines that hold a ``#`` comment."""
    source = Path(path).read_text(encoding="utf-8")
    comments = frozenset(token.start[0] for token in tokenize.generate_tokens(io.StringIO(source).readline)
                         if token.type == tokenize.COMMENT)
    return source, ast.parse(source), comments


def _class_node(cls: type) -> tuple[str, ast.ClassDef, frozenset[int]] | None:
    """(source file, class statement, comment lines) of ``cls``, or None for a class made at run
    time (``dataclasses.make_dataclass``: no statement of its own)."""
    try:
        path = inspect.getsourcefile(cls)
    except TypeError:
        return None
    if path is None:
        return None
    _, tree, comments = _module_source(path)
    body: list[ast.stmt] = tree.body
    node = None
    for part in cls.__qualname__.split("."):
        node = next((n for n in body if isinstance(n, ast.ClassDef) and n.name == part), None)
        if node is None:
            return None
        body = node.body
    return path, node, comments


def _where(path: str, line: int) -> str:
    try:
        shown = Path(path).resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        shown = Path(path)
    return f"{shown} line {line}"


def field_help(cls: type) -> dict[str, str]:
    """The help of each leaf field of the dataclass ``cls`` (its own and its dataclass bases'):
    the attribute docstring right after the field, whitespace folded to single spaces.

    Args:
        cls: a config dataclass; fields whose type is a dataclass are sections and need no help
            here (their class docstring is theirs).

    Raises:
        ConfigDocError: a leaf field without an attribute docstring, a class without a docstring,
            or a ``#`` comment inside the class body (help belongs in the docstrings).
    """
    hints = typing.get_type_hints(cls)
    found: dict[str, tuple[str, int, str | None]] = {}  # name -> (file, line, help)
    for base in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(base):
            continue
        located = _class_node(base)
        if located is None:
            continue
        path, node, comments = located
        if ast.get_docstring(node) is None:
            raise ConfigDocError(f"{_where(path, node.lineno)}: class {base.__name__} has no docstring; add one "
                                 "saying what its section configures")
        stray = sorted(line for line in comments if node.lineno < line <= (node.end_lineno or node.lineno))
        if stray:
            raise ConfigDocError(f"{_where(path, stray[0])}: a # comment in {base.__name__}; move what it says into "
                                 "the field's docstring (the string on the line after the field)")
        for statement, after in zip(node.body, node.body[1:] + [None]):
            if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
                continue
            text = None
            if (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                text = " ".join(inspect.cleandoc(after.value.value).split())
            found[statement.target.id] = (path, statement.lineno, text or None)
    helps = {}
    for f in dataclasses.fields(cls):
        if _is_section(hints[f.name]):
            continue
        if f.name not in found:
            raise ConfigDocError(f"{cls.__name__}.{f.name}: no source to read its help from; declare the class in "
                                 "a file, with a docstring on the line after each field")
        path, line, text = found[f.name]
        if not text:
            raise ConfigDocError(f"{_where(path, line)}: {cls.__name__}.{f.name} has no help; add a docstring on the "
                                 'line after it, e.g. """What it sets (its choices)."""')
        helps[f.name] = text
    return helps


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def sections(config_cls: type | None = None) -> list[Section]:
    """Every section of the config tree, in the order a config file lists them: the top level,
    then each section followed by its own sub-sections (``data``, ``data.synthetic``, ...).

    Args:
        config_cls: the root dataclass; None: :data:`twotower_rec.config.Config` (with the tasks'
            sections).
    """
    if config_cls is None:
        from twotower_rec.config import Config

        config_cls = Config
    found: list[Section] = []

    def walk(cls: type, name: str) -> None:
        hints, helps = typing.get_type_hints(cls), field_help(cls)
        prefix = f"{name}." if name else ""
        options = [Option(prefix + f.name, type_name(hints[f.name]), yaml_value(_default(f)), helps[f.name])
                   for f in dataclasses.fields(cls) if not _is_section(hints[f.name])]
        found.append(Section(name, cls, options))
        for f in dataclasses.fields(cls):
            if _is_section(hints[f.name]):
                walk(hints[f.name], prefix + f.name)

    walk(config_cls, "")
    return found


def _outside_code(text: str, escape) -> str:
    """``escape`` applied to the parts of ``text`` outside backtick code spans."""
    parts = re.split(r"(`+[^`]*`+)", text)
    return "".join(part if part.startswith("`") else escape(part) for part in parts)


def _markdown(text: str) -> str:
    """Prose for Markdown: ``<``, which could open an HTML tag, written as an entity; Sphinx roles
    (``:class:`X```) as plain code."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"``\1``", text)
    return _outside_code(text, lambda part: part.replace("<", "&lt;"))


def _cell(text: str) -> str:
    """``text`` for a table cell: Markdown prose with its pipes escaped (in code spans too, as GFM wants)."""
    return _markdown(text).replace("|", "\\|")


def _code(text: str) -> str:
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _anchor(title: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def _readers_line(section: Section) -> str:
    """Which tasks read a section's options, for the sections only some tasks read; or ``""``."""
    from twotower_rec.tasks import TASKS

    keys = [o.key for o in section.options]
    reads = {name: [k for k in keys if task.reads_option(k)] for name, task in TASKS.items()}
    reads = {name: found for name, found in reads.items() if found}
    if not section.name or not reads:
        return ""
    whole = [f"task={name}" for name, found in reads.items() if found == keys]
    parts = [f"{' and '.join(whole)} (every option here)"] if whole else []
    parts += [f"task={name} ({', '.join(_code(k) for k in found)})" for name, found in reads.items() if found != keys]
    return (f"Read by {'; '.join(parts)} only. Under another task, an option set away from its default gives a "
            "warning that nothing reads it.")


_HOW_TO_SET = """\
## Setting options

- **A YAML file**, given to any verb as `--config FILE`: one mapping per section, the top-level
  options beside them.

  ```yaml
  run_dir: runs/big
  train:
    batch_size: 2048
    table_weight_decay: {t_history: 0.01}
  data:
    synthetic:
      num_users: 10000
  ```

- **`--set KEY=VALUE`** on the command line, with the option's dotted name, as often as needed:
  `--set train.batch_size=2048 --set model.mlp_dims=[256,128]`. The value is read as YAML
  (`null`, `true`, `[1, 2]`, `{t_history: 0.01}`); text YAML cannot read, such as `%d/%m/%Y`,
  is kept as it is written.
- **Precedence**: `--set` (a later one wins over an earlier one) > the YAML file > the defaults
  below. The Python API takes the same: `load_config(path, overrides=["train.batch_size=2048"])`.
- **Checks**: an unknown key is an error naming the closest valid one (a renamed key names its
  new place: [Renamed options](#renamed-options)); a value of the wrong type is an error naming
  the key. Values are then checked against their choices and ranges and against each other.
  An option set away from its default where the run reads nothing of it (another task's section,
  or the encoder options under `model.history_encoder: bag`) gives a `warning:` line.
- **`run_dir`**: `data.cache_dir`, `train.out_dir` and `export.dir` left empty become
  `<run_dir>/data`, `<run_dir>/train` and `<run_dir>/export`; the three must be separate folders,
  none inside another. Checkpoints and exports save the whole config they were made with.
"""


def render(config_cls: type | None = None) -> str:
    """The text of ``docs/configuration.md``: a header, how to set options, one section per
    config section (its class docstring and a table of name, type, default, help) and the
    options renamed since earlier versions.

    Args:
        config_cls: the root dataclass; None: :data:`twotower_rec.config.Config`.

    Raises:
        ConfigDocError: an option or section without help (:func:`field_help`).
    """
    from twotower_rec.config import MOVED

    found = sections(config_cls)
    count = sum(len(s.options) for s in found)
    out = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{COMMAND}`; do not edit. Edit the docstrings of the config dataclasses and rerun it. -->",
        "",
        f"Every option of a run's config ({count} in {len(found)} sections), generated from the docstrings of "
        "the config dataclasses in `twotower_rec/config.py` and `twotower_rec/tasks/*.py`: edit those, then run "
        f"`{COMMAND}` to rewrite this file (`--check` tells whether it is current; "
        "`tests/test_config_reference.py` fails when it is not).",
        "",
        "Sections: " + ", ".join(f"[{_title(s)}](#{_anchor(_title(s))})" for s in found) + ".",
        "",
        _HOW_TO_SET,
    ]
    for section in found:
        out += _section_text(section)
    out += ["## Renamed options", "",
            "Options of earlier versions; a config that names one is refused with its new place.", "",
            "| old option | now |", "|---|---|"]
    out += [f"| {_cell(_code(old))} | {_cell(new)} |" for old, new in MOVED.items()]
    return "\n".join(out) + "\n"


def _title(section: Section) -> str:
    return section.name or "top level"


def _section_text(section: Section) -> list[str]:
    doc = section.cls.__doc__ if section.name else ("Options outside any section (in YAML, at the top of the file; "
                                                    "on the command line, `--set run_dir=runs/big`).")
    out = [f"## {_title(section)}", "", _markdown(" ".join(inspect.cleandoc(doc or "").split())), ""]
    source = _class_node(section.cls)
    if section.name and source is not None:
        path, root = Path(source[0]).resolve(), Path(__file__).resolve().parents[1]
        shown = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        readers = _readers_line(section)
        out += [f"Declared by `{section.cls.__name__}` in `{shown}`." + (f" {readers}" if readers else ""), ""]
    if not section.options:
        return out
    out += ["| option | type | default | help |", "|---|---|---|---|"]
    details = []
    for option in section.options:
        summary, rest = first_sentence(option.help)
        out.append(f"| {_cell(_code(option.key))} | {_cell(option.type)} | {_cell(_code(option.default))} | "
                   f"{_cell(summary)} |")
        if rest:
            details.append(f"- {_code(option.key)}: {_markdown(rest)}")
    out.append("")
    if details:
        out += details + [""]
    return out


def main(argv: list[str] | None = None) -> int:
    """Write the reference, or with ``--check`` compare it with the file (exit 1 and a diff when
    they differ).

    Args:
        argv: the command-line arguments; None: ``sys.argv[1:]``.

    Returns:
        0 when written or current, 1 when ``--check`` finds it out of date, 2 for an option
        without help.
    """
    parser = argparse.ArgumentParser(prog=COMMAND, description="Write docs/configuration.md from the config "
                                                               "dataclasses' field docstrings.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the file to write (default {DEFAULT_OUT})")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when --out differs")
    args = parser.parse_args(argv)
    try:
        text = render()
    except ConfigDocError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.check:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
        return 0
    current = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
    if current == text:
        return 0
    diff = difflib.unified_diff(current.splitlines(keepends=True), text.splitlines(keepends=True),
                                f"{args.out} (committed)", f"{args.out} (from the dataclasses)")
    sys.stderr.writelines(diff)
    state = "is missing" if not args.out.is_file() else "is out of date"
    print(f"\n{args.out} {state}: run `{COMMAND}` and commit it", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
