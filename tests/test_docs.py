"""The documentation: README.md stays short and names the two commands, and every relative link
in README.md, BENCHMARKS.md and docs/*.md leads to a file that exists (and a ``#anchor`` to one of
its headings), so the README's results links land on sections BENCHMARKS.md and
docs/benchmarks-history.md have.

Anchors follow GitHub's rule for heading ids: the heading's text (inline code, emphasis and links
rendered to their text) in lower case, every character that is not a letter, digit, space,
hyphen or underscore dropped, spaces turned into hyphens; a repeated heading gets ``-1``,
``-2``, ... Headings inside fenced code blocks are not headings.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_LIMIT = 12_000  # bytes: a newcomer's ten minutes
COMMANDS = ("make demo", "make test")

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_EXTERNAL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*:|//)")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """The lines outside fenced code blocks, with their 1-based numbers.

    Args:
        text: a Markdown file's text.
    """
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """The id GitHub gives a heading (without the ``-1`` of a repeated one).

    Args:
        heading: the heading's Markdown text, without the leading ``#``.
    """
    text = _CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link reads as its text
    text = re.sub(r"(\*+|(?<!\w)_+|_+(?!\w))", "", text)  # emphasis marks; snake_case stays
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading id of a Markdown file, repeated headings numbered as GitHub numbers them.

    Args:
        path: the Markdown file.
    """
    found: set[str] = set()
    counts: dict[str, int] = {}
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        n = counts.get(base, 0)
        counts[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def link_targets(text: str) -> list[tuple[int, str]]:
    """The link targets of a Markdown text (inline links, images, reference definitions), with
    their line numbers; code blocks and code spans hold no links.

    Args:
        text: a Markdown file's text.
    """
    targets = []
    for number, line in prose_lines(text):
        reference = _REFERENCE.match(line)
        if reference:
            targets.append((number, reference.group(1)))
            continue
        for match in _LINK.finditer(_CODE_SPAN.sub("", line)):
            targets.append((number, match.group(1)))
    return targets


def broken_links(path: Path) -> list[str]:
    """One line per relative link of ``path`` that leads nowhere: a missing file, or an anchor no
    heading of the target has.

    Args:
        path: the Markdown file whose links are checked.
    """
    problems = []
    for number, target in link_targets(path.read_text(encoding="utf-8")):
        if not target or _EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.name}:{number}: {target}"
        if not destination.exists():
            problems.append(f"{where}: no file {destination}")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            problems.append(f"{where}: {destination.name} has no heading with the id '{anchor}'")
    return problems


def readme_problems(path: Path) -> list[str]:
    """What the README rules find wrong with ``path``: its size and the two commands.

    Args:
        path: a README file.
    """
    size = len(path.read_bytes())
    text = path.read_text(encoding="utf-8")
    problems = [f"{path.name} is {size} bytes, over {README_LIMIT}: move detail into docs/"] if size > README_LIMIT \
        else []
    problems += [f"{path.name} does not name `{command}`" for command in COMMANDS if command not in text]
    return problems


def _documents() -> list[Path]:
    return [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_short_and_names_both_commands():
    assert readme_problems(ROOT / "README.md") == []


def test_every_relative_link_resolves():
    problems = [line for document in _documents() for line in broken_links(document)]
    assert problems == [], "\n".join(problems)


def test_docs_folder_has_the_topic_pages():
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    expected = {"data.md", "training.md", "distributed.md", "evaluation.md", "serving.md", "python-api.md",
                "architecture.md"}
    assert expected <= pages, sorted(expected - pages)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = expected | {"configuration.md", "benchmarks-history.md"}
    assert [page for page in sorted(linked) if f"(docs/{page})" not in readme] == []
    assert "(configuration.md)" in (ROOT / "docs" / "training.md").read_text(encoding="utf-8")


def test_readme_results_link_into_benchmarks_sections():
    targets = [target for _, target in link_targets((ROOT / "README.md").read_text(encoding="utf-8"))]
    assert [t for t in targets if t.startswith("BENCHMARKS.md#")], "README's results link no BENCHMARKS.md section"


@pytest.mark.parametrize("heading, expected", [
    ("Retrieval quality on ml-latest-small (issue: retrieval quality)",
     "retrieval-quality-on-ml-latest-small-issue-retrieval-quality"),
    ("`retrieval.compile`, the roofline after it", "retrievalcompile-the-roofline-after-it"),
    ("Test split, seeds 0-4 (mean ± sample std)", "test-split-seeds-0-4-mean--sample-std"),
    ("The package's training step against plain-PyTorch two-towers",
     "the-packages-training-step-against-plain-pytorch-two-towers"),
    ("Load test of `twotower-rec serve`", "load-test-of-twotower-rec-serve"),
    ("**Bold** and [a link](x.md) in configs/ml_latest_small.yaml", "bold-and-a-link-in-configsml_latest_smallyaml"),
])
def test_slug_follows_githubs_rule(heading, expected):
    assert slug(heading) == expected


def test_link_check_reports_missing_files_and_anchors(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Same\n\n## Same\n\n```\n# not a heading\n```\n")
    (tmp_path / "page.md").write_text(
        "# Page\n\n"
        "[fine](other.md) [fine anchor](other.md#other-page) [repeat](other.md#same-1) [here](#page)\n"
        "[missing file](nothere.md) [bad anchor](other.md#nope) [code block heading](other.md#not-a-heading)\n"
        "[web](https://example.com/x.md) `[in code](gone.md)`\n"
        "```\n[in a block](gone.md)\n```\n"
        "[ref]: gone-too.md\n")
    problems = broken_links(tmp_path / "page.md")
    assert [p.split(": ")[1] for p in problems] == ["nothere.md", "other.md#nope", "other.md#not-a-heading",
                                                    "gone-too.md"]


def test_readme_check_reports_size_and_missing_command(tmp_path):
    good = tmp_path / "README.md"
    good.write_text("make demo\nmake test\n")
    assert readme_problems(good) == []
    long = tmp_path / "LONG.md"
    long.write_text("make demo and make test\n" + "x" * README_LIMIT)
    assert len(readme_problems(long)) == 1 and "bytes" in readme_problems(long)[0]
    short = tmp_path / "SHORT.md"
    short.write_text("make demo only\n")
    assert readme_problems(short) == ["SHORT.md does not name `make test`"]
