"""design/ stays true: the drawn tables are exactly the tables the code enforces."""

from __future__ import annotations

from pathlib import Path

from jobcore import docgen

DESIGN = Path(__file__).resolve().parents[1] / "design"


def test_tables_md_is_generated_from_the_code() -> None:
    assert (DESIGN / "tables.md").read_text() == docgen.render(), (
        "design/tables.md is stale: run `python -m jobcore.docgen > design/tables.md`"
    )


def test_every_design_page_linked_from_the_overview_exists() -> None:
    overview = (DESIGN / "README.md").read_text()
    for page in ("tables.md", "scheduling.md", "legacy.md", "xml.md", "qemu.md", "daemon.md"):
        assert f"({page})" in overview
        assert (DESIGN / page).exists(), page
