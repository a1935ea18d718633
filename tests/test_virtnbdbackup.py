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
    with Jobd(xdg / "jobcore", "--stop-guests", env={"XDG_RUNTIME_DIR": str(xdg)}).wait_ready():
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


CHECK_SIM = """\
import libvirt

dom = libvirt.open("sim:///default").lookupByName("vm1")
print([c.getName() for c in dom.listAllCheckpoints()], dom.jobStats()["type"])
"""


def test_on_sim_as_far_as_sim_serves_nbd(tmp_path: Path) -> None:
    """sim serves no NBD: on sim:///default virtnbdbackup makes every libvirt call of a full
    backup (checkpoints, XMLDesc, a pull backupBegin with its checkpoint, abortJob) and
    fails only when it connects to the export."""
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    (tmp_path / "check.py").write_text(CHECK_SIM)
    env = {"XDG_RUNTIME_DIR": str(xdg), "HOME": str(tmp_path)}
    with Jobd(xdg / "jobcore", env={"XDG_RUNTIME_DIR": str(xdg)}).wait_ready():
        argv = ["virtnbdbackup", "-U", "sim:///default", "-d", "vm1", "-l", "full"]
        proc = jobctl(None, "run", "--", *argv, "-o", str(tmp_path / "out"), env=env, timeout=120)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "Unable to connect nbd server" in proc.stderr
        before = proc.stderr.split("Unable to connect nbd server")[0].splitlines()[:-1]
        complaints = [line for line in before if " ERROR " in line or " WARNING " in line]
        # the one warning before NBD: fsFreeze without a guest agent, as with libvirt
        assert len(complaints) == 1 and "QEMU guest agent is not configured" in complaints[0]
        check = jobctl(None, "run", "--", "python3", str(tmp_path / "check.py"), env=env)
    assert check.returncode == 0, check.stderr
    # the checkpoint was made with the backup; abortJob ended the backup
    assert check.stdout.split() == ["['virtnbdbackup.0']", "0"]


#: what a virtnbdbackup killed (SIGKILL) right after backupBegin leaves: a running pull
LEFT_RUNNING = """\
import sys
import libvirt

dom = libvirt.open("qemu:///session").lookupByName(sys.argv[1])
dom.backupBegin(
    "<domainbackup mode='pull'><server transport='unix' socket='" + sys.argv[2] + "'/>"
    "<disks><disk name='vda'><scratch file='" + sys.argv[3] + "'/></disk></disks>"
    "</domainbackup>", None)
"""


def test_a_backup_left_running_is_detected_then_killed(tmp_path: Path) -> None:
    """A pull backup left running (its virtnbdbackup was killed): the next run sees it in
    blockJobInfo and exits 1 with "Detected an active backup operation", as with libvirt
    (not a failing backupBegin); ``virtnbdbackup -k`` ends it and a full backup runs."""
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    env = {"XDG_RUNTIME_DIR": str(xdg), "HOME": str(tmp_path)}
    disks = {"vda": create(tmp_path / "vda.qcow2", "16M")}
    xml = tmp_path / "lv4.xml"
    xml.write_text(domain_xml("lv4", disks))
    for name, text in (("create.py", CREATE), ("left.py", LEFT_RUNNING)):
        (tmp_path / name).write_text(text)
    backup = ["virtnbdbackup", "-U", "qemu:///session", "-d", "lv4", "-o"]
    with Jobd(xdg / "jobcore", "--stop-guests", env={"XDG_RUNTIME_DIR": str(xdg)}).wait_ready():
        for argv in (
            ("python3", str(tmp_path / "create.py"), str(xml)),
            ("python3", str(tmp_path / "left.py"), "lv4", str(tmp_path / "nbd.sock"),
             str(tmp_path / "scratch.qcow2")),
        ):  # fmt: skip
            made = jobctl(None, "run", "--", *argv, env=env, timeout=120)
            assert made.returncode == 0, made.stderr
        again = jobctl(None, "run", "--", *backup, str(tmp_path / "b1"), "-l", "full",
                       env=env, timeout=120)  # fmt: skip
        assert again.returncode == 1, again.stderr
        assert "Detected an active backup operation" in again.stderr, again.stderr
        assert "Failed to start backup" not in again.stderr
        tool(xdg, *backup, str(tmp_path / "b2"), "-k")
        tool(xdg, *backup, str(tmp_path / "b3"), "-l", "full")
    assert (tmp_path / "b3" / "vda.full.data").exists()
