"""The drivers' import layering (issue 9), read from the import graph grimp builds from
the source (TYPE_CHECKING imports count too): the qemu runners reach their connection
through the host protocol only, no driver reaches the engine, the API, jobd or the remote
client (drivers depend on the driver protocol, jobcore.driver), and drivers/ has no import
cycle."""

from __future__ import annotations

import grimp
import pytest

#: what a driver must never import, directly or through another module; a module that
#: moves is renamed here (a name missing from the graph fails the test)
ENGINE_SIDE = ("jobcore.engine", "jobcore.api", "jobcore.daemon", "jobcore.remote")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("drivers", "jobcore", cache_dir=None)


def chains(graph: grimp.ImportGraph, importer: str, imported: str) -> set[tuple[str, ...]]:
    assert imported in graph.modules, f"{imported} is not a module any more: rename it here"
    return graph.find_shortest_chains(importer=importer, imported=imported, as_packages=True)


def test_the_runners_are_one_module_per_family_behind_the_host_protocol(
    graph: grimp.ImportGraph,
) -> None:
    assert graph.find_children("drivers.qemu.runners") == {
        f"drivers.qemu.runners.{name}"
        for name in ("host", "base", "backup", "backup_checks", "chain", "migration")
    }
    # the connection picks a runner per job type: it imports them, never the other way
    assert graph.direct_import_exists(
        importer="drivers.qemu.connection", imported="drivers.qemu.runners.base"
    )


@pytest.mark.parametrize("forbidden", ["drivers.qemu.connection", "jobcore.engine"])
def test_the_runners_import_neither_the_connection_nor_the_engine(
    graph: grimp.ImportGraph, forbidden: str
) -> None:
    assert chains(graph, "drivers.qemu.runners", forbidden) == set()


@pytest.mark.parametrize("forbidden", ENGINE_SIDE)
def test_drivers_never_import_the_engine_side(graph: grimp.ImportGraph, forbidden: str) -> None:
    assert chains(graph, "drivers", forbidden) == set()


def test_drivers_have_no_import_cycle(graph: grimp.ImportGraph) -> None:
    modules = graph.find_descendants("drivers")
    cycles = {
        (module, imported)
        for module in modules
        for imported in graph.find_modules_directly_imported_by(module) & modules
        if graph.chain_exists(importer=imported, imported=module)
    }
    assert cycles == set()
