"""Real QEMU: a domain created from a real libvirt domain XML, its XMLDesc (what the
process runs, each disk's chain from the driver's block nodes, changing after a block
pull and a block commit), isActive, and qemuMonitorCommand: QMP JSON with its id, QEMU's
error reply as it came, and HMP ``qemu-io`` writing into the running guest's disk (the
libvirt-qemu flow virtnbdbackup's tests use), the data found in the image afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest
from jobd_helpers import Jobd
from qemu_helpers import create, write
from test_domain_xml import virtnbdbackup_disks

import jobcore
from jobcore import constants as C
from jobcore.errors import InvalidArgument, OperationInvalid
from jobcore.local import as_local
from jobcore.xml.domain import parse_domain

pytestmark = [pytest.mark.qemu, pytest.mark.anyio]
HMP = C.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


LIBVIRT_XML = """<domain type='kvm'>
  <name>lv1</name>
  <uuid>1b7c7a4e-33a5-4e57-9d0f-5d2b0c6f1e01</uuid>
  <memory unit='KiB'>65536</memory>
  <currentMemory unit='KiB'>65536</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><apic/></features>
  <cpu mode='host-model' check='partial'/>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' discard='unmap'/>
      <source file='{top}'/>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{data}'/>
      <target dev='vdb' bus='scsi'/>
    </disk>
    <controller type='scsi' index='0' model='virtio-scsi'/>
    <interface type='user'><mac address='52:54:00:12:34:56'/><model type='virtio'/></interface>
    <console type='pty'><target type='serial' port='0'/></console>
    <graphics type='vnc' port='-1' autoport='yes'/>
    <memballoon model='virtio'/>
  </devices>
</domain>
"""


def _layer_node(nodes: list[dict[str, Any]], file: str) -> str:
    """The format node of ``file``, found as a libvirt-qemu user finds it: by QMP."""
    found = [n["node-name"] for n in nodes if n.get("file") == file and n.get("drv") == "qcow2"]
    assert len(found) == 1, nodes
    return str(found[0])


async def test_libvirt_xml_describe_chains_and_monitor(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", "16M")
    write(base, "write -P 0x11 0 1M")
    mid = create(tmp_path / "mid.qcow2", "16M", backing=base)
    top = create(tmp_path / "top.qcow2", "16M", backing=mid)
    data = create(tmp_path / "data.qcow2", "16M")
    async with jobcore.connect(f"qemu:///session?dir={tmp_path / 'run'}") as conn:
        dom = await conn.create_domain(LIBVIRT_XML.format(top=top, data=data))
        assert await dom.is_active() is True
        xml = await dom.xml_desc()
        kvm = json.loads(await dom.qemu_monitor_command('{"execute": "query-kvm"}'))["return"]
        virt = "kvm" if kvm["enabled"] else "qemu"
        assert f"<domain type='{virt}'>" in xml
        assert "<memory unit='KiB'>65536</memory>" in xml
        assert "<uuid>1b7c7a4e-33a5-4e57-9d0f-5d2b0c6f1e01</uuid>" in xml
        assert virtnbdbackup_disks(xml) == [
            ("vda", "qcow2", str(top), [str(mid), str(base)]),
            ("vdb", "qcow2", str(data), []),
        ]
        assert [d.bus for d in parse_domain(xml).disks] == ["virtio", "scsi"]

        # QMP passthrough: the reply text with the caller's id, QEMU's error as it came
        reply = json.loads(
            await dom.qemu_monitor_command('{"execute": "query-status", "id": "t-1"}')
        )
        assert reply["id"] == "t-1" and reply["return"]["status"] in ("running", "prelaunch")
        err = json.loads(await dom.qemu_monitor_command('{"execute": "no-such-command"}'))
        assert err["error"]["class"] == "CommandNotFound" and "id" in err
        with pytest.raises(InvalidArgument, match="not JSON"):
            await dom.qemu_monitor_command("query-status")
        with pytest.raises(InvalidArgument, match="unsupported flags"):
            await dom.qemu_monitor_command("info status", 4)

        # HMP qemu-io into the running guest's disks, through the node QMP names
        nodes = json.loads(
            await dom.qemu_monitor_command(
                '{"execute": "query-named-block-nodes", "arguments": {"flat": true}}'
            )
        )["return"]
        vdb = _layer_node(nodes, str(data))
        out = await dom.qemu_monitor_command(f'qemu-io {vdb} "write -P 0xab 0 64k"', HMP)
        assert "rror" not in out, out  # HMP qemu-io reports failures in its text
        await dom.qemu_monitor_command(f'qemu-io {vdb} "flush"', HMP)
        info_block = await dom.qemu_monitor_command("info block -n", HMP)
        assert vdb in info_block

        # a block pull of mid into top: the chain shown loses mid
        await (await dom.job_begin("<job type='blockpull'><disk name='vda'/>"
                                   f"<base file='{base}'/></job>")).wait(60)  # fmt: skip
        assert virtnbdbackup_disks(await dom.xml_desc())[0][3] == [str(base)]
        # an active commit into base, pivoted: base is the active layer now
        await dom.block_commit("vda", None, None, 0, C.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)
        await _pivot(dom)
        desc = virtnbdbackup_disks(await dom.xml_desc())[0]
        assert (desc[2], desc[3]) == (str(base), [])
        assert "backingStore" not in await dom.xml_desc(C.VIR_DOMAIN_XML_INACTIVE)
        await dom.destroy()
        # a domain whose QEMU died is not active, and has no monitor to talk to
        other = create(tmp_path / "other.qcow2", "16M")
        dead = await conn.create_domain(
            LIBVIRT_XML.format(top=other, data=create(tmp_path / "d2.qcow2", "16M")).replace(
                "<name>lv1</name>", "<name>lv2</name>"
            )
        )
        os.kill(as_local(conn).driver.pid("lv2"), signal.SIGKILL)  # type: ignore[attr-defined]
        with anyio.fail_after(30):
            while True:  # QEMU's exit is noticed by the driver's reaper
                if not await dead.is_active():
                    break
                await anyio.sleep(0.05)
        with pytest.raises(OperationInvalid, match="'lv2' is not running"):
            await dead.qemu_monitor_command("info status", HMP)
    # the HMP write landed in the image: 64 KiB of 0xab, the rest untouched
    assert _holds(data, "0xab", 0) and _holds(data, "0", 64 * 1024)
    assert not _holds(data, "0xcd", 0)


def _holds(image: Path, pattern: str, offset: int) -> bool:
    """Whether ``image`` holds 64 KiB of byte ``pattern`` at ``offset`` (qemu-io -r)."""
    res = subprocess.run(
        ["qemu-io", "-r", "-f", "qcow2", "-c", f"read -P {pattern} {offset} 64k", str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    text = res.stdout + res.stderr
    assert "read 65536/65536 bytes" in text or "Pattern verification failed" in text, text
    return "Pattern verification failed" not in text


async def _pivot(dom: Any) -> None:
    """Wait for the active commit to be ready, then pivot (blockJobAbort PIVOT)."""
    with anyio.fail_after(60):
        while True:
            info = await dom.block_job_info("vda")
            if info and info["cur"] == info["end"]:
                break
            await anyio.sleep(0.05)
    await dom.block_job_abort("vda", C.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)


def test_through_jobd_a_client_writes_into_the_guest_with_hmp(tmp_path: Path) -> None:
    """The libvirt-qemu flow over jobd's socket (blocking facade): createXML from a libvirt
    XML, XMLDesc, isActive, HMP qemu-io into vdb; the read-only socket refuses the monitor."""
    qemu_dir = tmp_path / "qemu"
    top = create(tmp_path / "top.qcow2", "16M")
    data = create(tmp_path / "data.qcow2", "16M")
    with Jobd(tmp_path / "run", "--allow-uri", f"qemu:///session?dir={qemu_dir}") as daemon:
        daemon.wait_ready()
        uri = f"qemu+unix:///session?socket={daemon.sock}&dir={qemu_dir}"
        conn = jobcore.open(uri)
        try:
            dom = conn.createXML(LIBVIRT_XML.format(top=top, data=data))
            assert dom.isActive() == 1
            assert virtnbdbackup_disks(dom.XMLDesc(0))[1] == ("vdb", "qcow2", str(data), [])
            nodes = json.loads(
                dom.qemuMonitorCommand(
                    '{"execute": "query-named-block-nodes", "arguments": {"flat": true}}'
                )
            )["return"]
            vdb = _layer_node(nodes, str(data))
            out = dom.qemuMonitorCommand(f'qemu-io {vdb} "write -P 0x5c 1M 64k"', HMP)
            assert "rror" not in out, out
            ro = jobcore.open(uri.replace(str(daemon.sock), str(daemon.ro_sock)))
            try:
                seen = ro.lookupByName("lv1")
                assert seen.isActive() == 1 and str(data) in seen.XMLDesc()
                with pytest.raises(jobcore.AccessDenied, match="read-only"):
                    seen.qemuMonitorCommand("info status", HMP)
            finally:
                ro.close()
            dom.destroy()
        finally:
            conn.close()
    assert _holds(data, "0x5c", 1 << 20) and _holds(data, "0", 0)
