"""The qemu runners' folder: one module per job-type family behind the host protocol,
picked by the connection. The drivers' import rules (the driver protocol only, never the
engine side; no driver imports another; the runners never import the connection; no
cycles) are contracts in pyproject.toml's [tool.importlinter], checked by `make lint`."""

from __future__ import annotations

import grimp


def test_the_runners_are_one_module_per_family_behind_the_host_protocol() -> None:
    graph = grimp.build_graph("drivers", cache_dir=None)
    assert graph.find_children("drivers.qemu.runners") == {
        f"drivers.qemu.runners.{name}"
        for name in ("host", "base", "backup", "backup_checks", "chain", "migration")
    }
    # the connection picks a runner per job type: it imports them, never the other way
    assert graph.direct_import_exists(
        importer="drivers.qemu.connection", imported="drivers.qemu.runners.base"
    )
