"""README.md and docs/ are the user guide: every relative link must lead to a file of the repository, and every
`#anchor` to a heading of its page, so that a reader of a fresh clone never lands on nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text()))


def test_anchor_rules():
    assert github_anchor("`--fast` on the example CT (EPYC)") == "--fast-on-the-example-ct-epyc"
    assert github_anchor("Where the engine's time goes") == "where-the-engines-time-goes"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_readme_is_a_guide():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    assert text.index("bash scripts/demo.sh") < text.index("## Which method when")


RESULT = re.compile(r"benchmarks/results/([\w.\-]+(?:\{[\w.,\-]+\})?[\w.\-]*)")
NOT_COMMITTED = "not committed"


def cited_results(paragraph: str) -> list[str]:
    """`benchmarks/results/` files a paragraph names, brace lists expanded (`x.{json,md}` -> x.json, x.md)."""
    names = []
    for cited in RESULT.findall(paragraph):
        head, brace, tail = re.match(r"([^{]*)(?:\{([^}]*)\})?(.*)", cited).groups()
        names += [f"{head}{alternative}{tail}".rstrip(".") for alternative in (brace.split(",") if brace else [""])]
    return names


def test_result_citations_are_read_with_brace_lists():
    assert cited_results("output `benchmarks/results/speed_cpu_1.5mm.{json,md}`.") == ["speed_cpu_1.5mm.json",
                                                                                    "speed_cpu_1.5mm.md"]
    assert cited_results("(benchmarks/results/budgets.json).") == ["budgets.json"]
    assert cited_results("`benchmarks/results/q_{base,tucker0.25}.md`") == ["q_base.md", "q_tucker0.25.md"]


def unmarked_missing_results(text: str) -> list[str]:
    """Cited `benchmarks/results/` files that are not in the clone, in paragraphs that do not say they are not
    committed. Commands in code blocks are not citations."""
    missing = []
    for paragraph in re.split(r"\n\s*\n", FENCE.sub("", text)):
        marked = NOT_COMMITTED in " ".join(paragraph.split())  # the marker may be broken across lines
        missing += [name for name in cited_results(paragraph)
                    if not marked and not (REPO / "benchmarks" / "results" / name).is_file()]
    return missing


def test_the_rule_flags_an_unmarked_missing_file():
    committed = sorted(p.name for p in (REPO / "benchmarks" / "results").glob("*.json"))[0]
    text = (f"A figure (`benchmarks/results/{committed}`).\n\nAnother (`benchmarks/results/no_such.json`).\n\n"
            "A third (`benchmarks/results/gone.{json,md}`, not\ncommitted).\n\n```\nbenchmarks/results/cmd.json\n```\n")
    assert unmarked_missing_results(text) == ["no_such.json"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_cited_results_are_committed(page):
    """A figure's file under benchmarks/results/ is in the clone, or its paragraph says it is not committed (the
    figure then stands on its command and machine alone)."""
    missing = unmarked_missing_results(page.read_text())
    assert not missing, (f"{page.relative_to(REPO)} cites benchmarks/results/ files that are not committed, without "
                         f"saying so: {sorted(set(missing))}")


def test_committed_results_stay_small():
    """Only the summaries behind the docs' figures are committed (Markdown, JSON, plots), a few hundred kB in all."""
    files = [p for p in (REPO / "benchmarks" / "results").iterdir() if p.suffix in (".md", ".json", ".png")]
    assert sum(p.stat().st_size for p in files) < 400_000
