"""The documentation pages: docs/parameters.md is what the parameter schema gives, and every relative link in
README.md and docs/*.md leads to a file or folder of the repository."""

import argparse
import re
from pathlib import Path

from conftest import REPO
from rgbt_seg_ros.evaluation.reports import doc_files
from rgbt_seg_ros.pipeline.params import SPECS
from rgbt_seg_ros.tools import docs

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(text: str) -> list[str]:
    """The targets of the markdown links ``[text](target)`` in ``text`` that point into the repository."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"^(https?:|mailto:|#)", t)]


def test_parameters_page_is_what_the_parameter_schema_gives():
    assert (REPO / "docs" / "parameters.md").read_text() == docs.parameters_markdown(), (
        "docs/parameters.md differs from rgbt_seg_ros/pipeline/params.py: run `rgbt-seg docs params`"
    )
    args = argparse.Namespace(out=REPO / "docs" / "parameters.md", check=True)
    assert docs.run(args) == 0


def test_parameters_page_has_one_row_per_parameter_with_its_default_and_runtime_rule():
    rows = [line for line in docs.parameters_markdown().splitlines() if line.startswith("| `")]
    assert len(rows) == len(SPECS)
    for row, spec in zip(rows, SPECS):
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[0] == f"`{spec.name}`"
        assert cells[5] == ("yes" if spec.dynamic else "restart")


def test_check_fails_on_a_stale_page_and_writing_fixes_it(tmp_path: Path):
    page = tmp_path / "parameters.md"
    page.write_text("old\n")
    args = argparse.Namespace(out=page, check=True)
    assert docs.run(args) == 1 and page.read_text() == "old\n"
    args.check = False
    assert docs.run(args) == 0
    args.check = True
    assert docs.run(args) == 0


def test_link_extraction_keeps_relative_paths_only():
    text = (
        "[a](docs/node.md) [b](docs/node.md#topics) [c](https://x.org/y) [d](#local) [e](mailto:a@b.c)\n"
        "![img](docs/demo_contact_sheet.png) `[f](not/a/link.md)`\n```\n[g](in/code.md)\n```\n"
    )
    assert relative_links(text) == ["docs/node.md", "docs/node.md#topics", "docs/demo_contact_sheet.png"]


def test_every_relative_link_in_readme_and_docs_resolves():
    broken = []
    files = doc_files(REPO)
    assert REPO / "README.md" in files and len(files) >= 5
    for f in files:
        for target in relative_links(f.read_text()):
            path = target.split("#", 1)[0]
            if not (f.parent / path).exists():
                broken.append(f"{f.relative_to(REPO)}: {target}")
    assert broken == []


def test_no_page_cites_files_outside_the_repository():
    outside = []
    for f in doc_files(REPO):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"\.\./shared\b|\.\./\.\./", line):
                outside.append(f"{f.relative_to(REPO)}:{n}: {line.strip()}")
    assert outside == []
