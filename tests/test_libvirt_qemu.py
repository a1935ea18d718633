"""jobcore.libvirt on real QEMU through the jobd of the default run directory: a domain
created by one libvirt-python program outlives it, the next one finds it and runs a block
pull with BLOCK_JOB and BLOCK_JOB_2 in libvirt's argument order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from jobd_helpers import ROOT, Jobd, jobctl
from qemu_helpers import compare, create, domain_xml, write

pytestmark = pytest.mark.qemu

CREATE = """\
import sys
import libvirt

conn = libvirt.open("qemu:///session")
dom = conn.createXML(open(sys.argv[1]).read(), 0)
print(dom.name(), dom.isActive())
"""

PULL = """\
import json
import libvirt
import libvirt_qemu

libvirt.registerErrorHandler(f=lambda ctx, err: None, ctx=None)
libvirt.virEventRegisterDefaultImpl()
conn = libvirt.open("qemu:///session")
dom = conn.lookupByName("lv1")
before = {
    "xml": dom.XMLDesc(0),
    "qmp": json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute": "query-status"}', 0)),
    "hmp": libvirt_qemu.qemuMonitorCommand(
        dom, "info status", libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP),
}
events = []
for event_id in (libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2):
    conn.domainEventRegisterAny(
        dom, event_id,
        lambda c, d, disk, type_, status, opaque: events.append(
            [opaque, d.name(), disk, type_, status]),
        event_id,
    )
dom.blockPull("vda", 0, 0)
while len(events) < 2:
    libvirt.virEventRunDefaultImpl()
try:
    conn.lookupByName("lv2")
except libvirt.libvirtError as e:
    no_domain = [e.get_error_code(), e.get_error_domain()]
out = {"active": dom.isActive(), "events": events, "no_domain": no_domain,
       "after": dom.blockJobInfo("vda"), "after_xml": dom.XMLDesc(0), **before}
dom.destroy()
print(json.dumps(out))
"""


def run(xdg: Path, *command: str) -> subprocess.CompletedProcess[str]:
    return jobctl(None, "run", "--", *command, timeout=120, env={"XDG_RUNTIME_DIR": str(xdg)})


def test_a_domain_created_without_jobd_warns_that_it_dies_with_the_process(
    tmp_path: Path,
) -> None:
    """No jobd: createXML on qemu:///session starts QEMU in-process, which stops when the
    program exits (libvirt would have spawned its session daemon): said on stderr, as a
    warning at the program's own line, and the next program finds no such domain."""
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    xml = tmp_path / "lv0.xml"
    xml.write_text(domain_xml("lv0", {"vda": create(tmp_path / "vda.qcow2", "8M")}))
    script = tmp_path / "create.py"
    script.write_text(CREATE)
    made = run(xdg, "python3", str(script), str(xml))
    assert made.returncode == 0, made.stderr
    assert made.stdout.split() == ["lv0", "1"]
    assert f"{script}:" in made.stderr and "InProcessDomainWarning" in made.stderr
    assert "runs in this process only" in made.stderr and "jobctl daemon" in made.stderr


def test_domain_outlives_its_creator_and_pulls(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    base = create(tmp_path / "base.qcow2", "8M")
    write(base, "write -P 0x5a 0 1M")
    top = create(tmp_path / "top.qcow2", "8M", backing=base)
    vdb = create(tmp_path / "vdb.qcow2", "8M")
    xml = tmp_path / "lv1.xml"
    xml.write_text(domain_xml("lv1", {"vda": top, "vdb": vdb}))
    (tmp_path / "create.py").write_text(CREATE)
    (tmp_path / "pull.py").write_text(PULL)
    with Jobd(xdg / "jobcore", "--stop-guests", env={"XDG_RUNTIME_DIR": str(xdg)}).wait_ready():
        made = run(xdg, "python3", str(tmp_path / "create.py"), str(xml))
        assert made.returncode == 0, made.stderr
        assert made.stdout.split() == ["lv1", "1"]
        assert "InProcessDomainWarning" not in made.stderr  # jobd's: it lives on
        pulled = run(xdg, "python3", str(tmp_path / "pull.py"))
        assert pulled.returncode == 0, pulled.stderr
        assert "Traceback" not in pulled.stderr
        out: dict[str, Any] = json.loads(pulled.stdout)
    assert out["active"] == 1
    assert out["no_domain"] == [42, 10]  # VIR_ERR_NO_DOMAIN from VIR_FROM_QEMU
    by_id = {e[0]: e[1:] for e in out["events"]}
    pull, completed = 1, 0  # VIR_DOMAIN_BLOCK_JOB_TYPE_PULL, VIR_DOMAIN_BLOCK_JOB_COMPLETED
    assert by_id[16] == ["lv1", "vda", pull, completed]  # BLOCK_JOB_2: the target
    assert by_id[8] == ["lv1", str(top), pull, completed]  # BLOCK_JOB: the active layer
    assert out["after"] == {}
    # libvirt's domain XML: the chain as <backingStore>, gone once pulled
    assert f"<source file='{top}'/>" in out["xml"].replace('"', "'")
    assert f"<source file='{base}'/>" in out["xml"].replace('"', "'")
    assert str(base) not in out["after_xml"]
    assert "return" in out["qmp"] and "status" in out["qmp"]["return"]
    assert "VM status" in out["hmp"]


PARALLEL = """\
import json
import sys
import libvirt

libvirt.registerErrorHandler(f=lambda ctx, err: None, ctx=None)
sock, scratch = sys.argv[1], sys.argv[2]
conn = libvirt.open("qemu:///session")
dom = conn.lookupByName("lv2")
# virtnbdbackup's own backup XML: vdb is not listed, so it is not backed up
dom.backupBegin(
    '<domainbackup mode="pull"><server transport="unix" socket="' + sock + '"/>'
    '<disks><disk name="vda"><scratch file="' + scratch + '"/></disk></disks></domainbackup>',
    None,
)
out = {"stats": dom.jobStats()}
dom.blockPull("vdb", 0, 0)  # real libvirt: "cannot acquire state change lock"
out["vdb"] = dom.blockJobInfo("vdb")
print(json.dumps(out), flush=True)
sys.stdin.readline()  # the test reads the export meanwhile
libvirt.virEventRegisterDefaultImpl()
done = []
conn.domainEventRegisterAny(
    dom, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, lambda c, d, p, o: done.append(p), None
)
out = {"abort": dom.abortJob()}
while not done:
    libvirt.virEventRunDefaultImpl()
out["completed"] = done[0]
print(json.dumps(out), flush=True)
dom.destroy()
"""


def test_pull_backup_of_vda_beside_a_block_pull_of_vdb(tmp_path: Path) -> None:
    """The point of it all: while a pull backup (virtnbdbackup's XML) holds vda, a block
    job runs on the same domain's vdb; the export serves vda as it was at the start."""
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    vda = create(tmp_path / "vda.qcow2", "8M")
    write(vda, "write -P 0x11 0 2M")
    base = create(tmp_path / "vdb-base.qcow2", "8M")
    write(base, "write -P 0x22 0 4M")
    vdb = create(tmp_path / "vdb.qcow2", "8M", backing=base)
    xml = tmp_path / "lv2.xml"
    xml.write_text(domain_xml("lv2", {"vda": vda, "vdb": vdb}))
    (tmp_path / "create.py").write_text(CREATE)
    (tmp_path / "parallel.py").write_text(PARALLEL)
    sock, scratch = tmp_path / "nbd.sock", tmp_path / "scratch.vda.qcow2"
    with Jobd(xdg / "jobcore", "--stop-guests", env={"XDG_RUNTIME_DIR": str(xdg)}).wait_ready():
        made = run(xdg, "python3", str(tmp_path / "create.py"), str(xml))
        assert made.returncode == 0, made.stderr
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobcore.cli", "run", "--", "python3",
             str(tmp_path / "parallel.py"), str(sock), str(scratch)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "XDG_RUNTIME_DIR": str(xdg)}, cwd=ROOT,
        )  # fmt: skip
        try:
            assert proc.stdout is not None and proc.stdin is not None
            first = json.loads(proc.stdout.readline() or "{}")
            assert first, proc.stderr.read() if proc.stderr else ""
            assert first["stats"]["operation"] == 9 and first["stats"]["type"] == 2
            assert first["vdb"] == {} or first["vdb"]["type"] == 1  # a pull (or done already)
            compare(f"nbd+unix:///vda?socket={sock}", vda)
            proc.stdin.write("\n")
            proc.stdin.flush()
            second = json.loads(proc.stdout.readline())
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert second["abort"] == 0
    assert second["completed"]["success"] is True  # a pull backup ends by abort, as in libvirt
    assert not scratch.exists()
