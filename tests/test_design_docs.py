"""design/ stays true: the drawn tables are exactly the tables the code enforces."""

from __future__ import annotations

import tomllib
from pathlib import Path

from jobcore import docgen
from jobcore.lifecycle import INITIAL, TERMINAL, TRANSITIONS, VERB_TARGET, JobState, Verb
from jobcore.registry import BUILTIN_TYPES

DESIGN = Path(__file__).resolve().parents[1] / "design"


def test_tables_md_is_generated_from_the_code() -> None:
    assert (DESIGN / "tables.md").read_text() == docgen.render(), (
        "design/tables.md is stale: run `python -m jobcore.docgen > design/tables.md`"
    )


def _diagram_edges() -> dict[tuple[str, str], str]:
    text = (DESIGN / "tables.md").read_text()
    block = text.split("```mermaid\n", 1)[1].split("```", 1)[0].splitlines()
    assert block[0] == "stateDiagram-v2"
    edges = {}
    for line in block[1:]:
        arrow, _, label = line.strip().partition(": ")
        a, b = arrow.split(" --> ")
        edges[(a, b)] = label
    return edges


def test_the_state_diagram_draws_exactly_the_transition_table() -> None:
    edges = _diagram_edges()
    drawn = {(a, b) for a, b in edges if "[*]" not in (a, b)}
    assert drawn == {(a.value, b.value) for a in JobState for b in TRANSITIONS[a]}
    assert {b for a, b in edges if a == "[*]"} == {s.value for s in INITIAL}
    assert {a for a, b in edges if b == "[*]"} == {s.value for s in TERMINAL}
    for (verb, state), target in VERB_TARGET.items():
        if target is not state:
            assert verb.value in edges[(state.value, target.value)].split(", ")


def test_the_verbs_per_type_table_is_each_types_verb_set() -> None:
    text = (DESIGN / "tables.md").read_text()
    for info in BUILTIN_TYPES:
        (row,) = [line for line in text.splitlines() if line.startswith(f"| **{info.type}** |")]
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        assert {v for v, c in zip(Verb, cells, strict=True) if c == "✓"} == info.verbs


def test_every_design_page_linked_from_the_overview_exists() -> None:
    overview = (DESIGN / "README.md").read_text()
    for page in ("tables.md", "scheduling.md", "legacy.md", "xml.md", "qemu.md", "daemon.md"):
        assert f"({page})" in overview
        assert (DESIGN / page).exists(), page


def test_the_drawn_layers_are_the_import_contracts_layers() -> None:
    """design/README.md's "Layers" picture is the layers contract `make lint` checks."""
    contracts = tomllib.loads((DESIGN.parent / "pyproject.toml").read_text())["tool"][
        "importlinter"
    ]["contracts"]
    (layers,) = [c["layers"] for c in contracts if c["id"] == "jobcore-layers"]
    text = (DESIGN / "README.md").read_text().split("\n## Layers\n", 1)[1]
    block = text.split("```\n", 2)[1].splitlines()
    drawn = [line.split("  (", 1)[0].strip() for line in block]
    assert drawn == layers
