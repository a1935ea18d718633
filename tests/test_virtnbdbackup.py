"""Debian's virtnbdbackup 1.9.15, unmodified, on jobcore (``jobctl run``): full and
incremental pull backups of a running QEMU domain with two qcow2 disks served by jobd,
data written into the running disks through ``qemuMonitorCommand`` (HMP ``qemu-io``)
between them, and ``virtnbdrestore`` of each level equal to the disks as they were."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from jobd_helpers import Jobd, jobctl
from qemu_helpers import compare, create, differs, domain_xml, run, write

pytestmark = pytest.mark.qemu

CREATE = """\
import sys
import libvirt

conn = libvirt.open("qemu:///session")
print(conn.createXML(open(sys.argv[1]).read(), 0).name())
"""

#: writes through the running domain's QEMU: qemu-io on each disk's active node
WRITE = """\
import json
import sys
import libvirt
import libvirt_qemu

conn = libvirt.open("qemu:///session")
dom = conn.lookupByName(sys.argv[1])
nodes = json.loads(libvirt_qemu.qemuMonitorCommand(
    dom, json.dumps({"execute": "query-named-block-nodes"}), 0))["return"]
for disk, command in json.loads(sys.argv[2]).items():
    source = sys.argv[3 + ["vda", "vdb"].index(disk)]
    (node,) = [n["node-name"] for n in nodes
               if n["file"] == source and n["drv"] == "qcow2"]
    for line in (command, "flush"):  # flushed: the test reads the image file meanwhile
        out = libvirt_qemu.qemuMonitorCommand(
            dom, 'qemu-io ' + node + ' "' + line + '"',
            libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        print(disk, node, line, out.strip())
"""


def tool(xdg: Path, *argv: str) -> str:
    """A virtnbd* command through ``jobctl run``: exit 0 and no traceback, its stderr."""
    proc = jobctl(
        None,
        "run",
        "--",
        *argv,
        timeout=300,
        env={"XDG_RUNTIME_DIR": str(xdg), "HOME": str(xdg.parent)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    return proc.stderr


def snapshot(image: Path, to: Path) -> Path:
    """The disk as it is now (nobody writes: the domain runs no guest code)."""
    run("qemu-img", "convert", "-U", "-O", "qcow2", str(image), str(to))
    return to


def test_full_incremental_restore(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    disks = {
        "vda": create(tmp_path / "vda.qcow2", "16M"),
        "vdb": create(tmp_path / "vdb.qcow2", "16M"),
    }
    write(disks["vda"], "write -P 0x11 0 2M")
    write(disks["vdb"], "write -P 0x22 4M 2M")
    xml = tmp_path / "lv3.xml"
    xml.write_text(domain_xml("lv3", disks))
    for name, text in (("create.py", CREATE), ("write.py", WRITE)):
        (tmp_path / name).write_text(text)
    out = tmp_path / "backup"
    with Jobd(xdg / "jobcore", "--stop-guests").wait_ready():
        made = jobctl(None, "run", "--", "python3", str(tmp_path / "create.py"), str(xml),
                      env={"XDG_RUNTIME_DIR": str(xdg)})  # fmt: skip
        assert made.returncode == 0, made.stderr
        at_full = {d: snapshot(p, tmp_path / f"{d}.full.qcow2") for d, p in disks.items()}
        tool(
            xdg, "virtnbdbackup", "-U", "qemu:///session", "-d", "lv3", "-l", "full", "-o", str(out)
        )
        commands = {"vda": "write -P 0x33 1M 1M", "vdb": "write -P 0x44 8M 512k"}
        wrote = jobctl(None, "run", "--", "python3", str(tmp_path / "write.py"), "lv3",
                       json.dumps(commands), str(disks["vda"]), str(disks["vdb"]),
                       env={"XDG_RUNTIME_DIR": str(xdg)})  # fmt: skip
        assert wrote.returncode == 0, wrote.stderr
        at_inc = {d: snapshot(p, tmp_path / f"{d}.inc.qcow2") for d, p in disks.items()}
        assert all(differs(at_full[d], at_inc[d]) for d in disks), wrote.stdout
        tool(
            xdg, "virtnbdbackup", "-U", "qemu:///session", "-d", "lv3", "-l", "inc", "-o", str(out)
        )
        assert sorted(p.name for p in out.glob("*.data")) == [
            "vda.full.data",
            "vda.inc.virtnbdbackup.1.data",
            "vdb.full.data",
            "vdb.inc.virtnbdbackup.1.data",
        ]
    for until, expected in (("virtnbdbackup.0", at_full), (None, at_inc)):
        target = tmp_path / f"restore-{until or 'last'}"
        argv = ["virtnbdrestore", "-U", "qemu:///session", "-i", str(out), "-o", str(target)]
        tool(xdg, *argv, *(["--until", until] if until else []))
        for disk, image in expected.items():
            compare(target / disks[disk].name, image)
    assert sorted(os.listdir(out / "checkpoints")) == ["virtnbdbackup.0.xml", "virtnbdbackup.1.xml"]
