"""Documented claims that must stay true: every row of the fault table (docs/faults.md) names tests that exist."""

import re

from conftest import REPO


def _fault_rows() -> list[list[str]]:
    text = (REPO / "docs" / "faults.md").read_text()
    section = text.split("# Fault and bad-input suite", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| case")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows]


def test_the_fault_table_has_at_least_40_cases_each_backed_by_an_existing_test():
    rows = _fault_rows()
    assert len(rows) >= 40
    for case, _behaviour, tests in rows:
        names, current = [], None
        for item in re.split(r"[;,]\s*", tests):
            item = item.strip()
            if "::" not in item:
                continue
            file, name = item.split("::", 1)
            current = file or current
            names.append((current, name))
        assert names, f"fault row '{case}' names no test"
        for file, name in names:
            source = (REPO / "test" / file).read_text()
            assert re.search(rf"^def {re.escape(name)}\(", source, re.M), f"{file}::{name} ({case}) does not exist"
