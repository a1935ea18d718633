"""Programs written for libvirt-python, run unmodified with ``jobctl run``: ``import
libvirt`` finds jobcore's module (also under Debian's /usr/bin/python3), in-process or
through the jobd of the default run directory; exit codes pass through; exit never hangs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from jobd_helpers import ROOT, Jobd, jobctl

DEBIAN_PYTHON = "/usr/bin/python3"

#: a client written exactly as for real libvirt-python
CLIENT = """\
import json
import sys

import libvirt


def ignore(ctx, err):
    pass


libvirt.registerErrorHandler(f=ignore, ctx=None)
libvirt.virEventRegisterDefaultImpl()
conn = libvirt.open(sys.argv[1])
dom = conn.lookupByName("vm1")
events = []


def job_completed(conn_, dom_, params, opaque):
    events.append(["job-completed", type(conn_).__name__, dom_.name(), params, opaque])


def block_job(conn_, dom_, disk, type_, status, opaque):
    events.append(["block-job-2", type(conn_).__name__, dom_.name(), disk, type_, status, opaque])


conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, job_completed, "o1")
conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, block_job, "o2")
dom.backupBegin(
    "<domainbackup mode='push'><disks>"
    "<disk name='vda' type='file'><target file='/b/" + sys.argv[2] + ".qcow2'/></disk>"
    "<disk name='vdb' backup='no'/></disks></domainbackup>",
    None,
)
while not any(e[0] == "job-completed" for e in events):
    libvirt.virEventRunDefaultImpl()
dom.blockPull("vdb", 0, 0)
while not any(e[0] == "block-job-2" and e[3] == "vdb" for e in events):
    libvirt.virEventRunDefaultImpl()
failures = {}
for name, call in (
    ("no_domain", lambda: conn.lookupByName("nosuch")),
    ("no_job", dom.abortJob),
    ("no_backup", dom.backupGetXMLDesc),
):
    try:
        call()
    except libvirt.libvirtError as e:
        failures[name] = [e.get_error_code(), e.get_error_domain(), e.get_error_message()]
print(json.dumps({
    "module": libvirt.__file__,
    "lib_version": conn.getLibVersion(),
    "events": events,
    "failures": failures,
    "stats": dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED),
}))
# the connection is never closed, as virtnbdbackup never closes it: exit must not hang
"""


@pytest.fixture
def xdg(tmp_path: Path) -> Path:
    """The default run directory's parent (XDG_RUNTIME_DIR) of this test."""
    path = tmp_path / "xdg"
    path.mkdir(mode=0o700)
    return path


def run(
    xdg: Path, *command: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``jobctl run -- COMMAND`` with ``xdg`` as XDG_RUNTIME_DIR."""
    return jobctl(
        None,
        "run",
        "--",
        *command,
        timeout=timeout,
        env={"XDG_RUNTIME_DIR": str(xdg), **(env or {})},
    )


def client(tmp_path: Path) -> str:
    path = tmp_path / "client.py"
    path.write_text(CLIENT)
    return str(path)


def check_client_output(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    assert out["module"] == str(ROOT / "jobcore" / "libvirt" / "shim" / "libvirt.py")
    assert out["lib_version"] == 9_000_000
    completed = [e for e in out["events"] if e[0] == "job-completed"]
    assert len(completed) == 1
    _, conn_type, dom, params, opaque = completed[0]
    assert (conn_type, dom, opaque) == ("virConnect", "vm1", "o1")
    assert params["operation"] == 9 and params["success"] is True  # VIR_DOMAIN_JOB_OPERATION_BACKUP
    assert params["disk_processed"] == params["disk_total"] > 0 and params["disk_remaining"] == 0
    assert "time_elapsed" in params and not {"type", "uuid", "state"} & set(params)
    pulls = [e for e in out["events"] if e[0] == "block-job-2" and e[3] == "vdb"]
    # (conn, dom, disk, type, status, opaque): a completed block pull of vdb
    assert pulls == [["block-job-2", "virConnect", "vm1", "vdb", 1, 0, "o2"]]
    backups = [e for e in out["events"] if e[0] == "block-job-2" and e[3] == "vda"]
    assert backups == [["block-job-2", "virConnect", "vm1", "vda", 5, 0, "o2"]]
    assert out["events"].index(completed[0]) < out["events"].index(backups[0])  # as libvirt
    failures = out["failures"]
    assert failures["no_domain"][:2] == [42, 12]  # VIR_ERR_NO_DOMAIN, VIR_FROM_TEST
    assert failures["no_domain"][2].startswith("Domain not found: ")
    assert failures["no_job"][0] == 55  # VIR_ERR_OPERATION_INVALID
    assert failures["no_backup"][0] == 104  # VIR_ERR_NO_DOMAIN_BACKUP
    assert out["stats"]["type"] == 3 and out["stats"]["operation"] == 9
    return out


def test_path_prints_the_shim_directory() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "jobcore.libvirt", "--path"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    shim = Path(proc.stdout.strip())
    assert sorted(p.name for p in shim.glob("*.py")) == ["libvirt.py", "libvirt_qemu.py"]
    bad = subprocess.run(
        [sys.executable, "-m", "jobcore.libvirt"], capture_output=True, text=True, cwd=ROOT
    )
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_client_in_process(tmp_path: Path, xdg: Path) -> None:
    """No jobd in the default run directory: the program runs sim in-process."""
    check_client_output(run(xdg, sys.executable, client(tmp_path), "sim:///default", "inproc"))


def test_client_through_jobd(tmp_path: Path, xdg: Path) -> None:
    """A jobd in the default run directory: sim:///default reaches it, and the jobs the
    program began are the daemon's (jobctl sees them after the program exited)."""
    with Jobd(xdg / "jobcore", env={"XDG_RUNTIME_DIR": str(xdg)}).wait_ready() as jobd:
        check_client_output(run(xdg, sys.executable, client(tmp_path), "sim:///default", "d1"))
        listed = jobctl(jobd.uri(), "list", "-d", "vm1", "--all", "--json")
        assert listed.returncode == 0, listed.stderr
        types = sorted(job["type"] for job in json.loads(listed.stdout))
        assert types == ["backup", "blockpull"]


def test_debian_python_imports_the_shim(tmp_path: Path, xdg: Path) -> None:
    """Debian's /usr/bin/python3 (the interpreter of virtnbdbackup) imports jobcore's
    libvirt ahead of python3-libvirt's, and jobcore with its dependencies."""
    script = (
        "import libvirt, libvirt_qemu, jobcore, lxml, sys;"
        "print(libvirt.__file__, libvirt_qemu.__file__, libvirt.getVersion(), sys.version_info[:2])"
    )
    proc = run(xdg, DEBIAN_PYTHON, "-c", script)
    assert proc.returncode == 0, proc.stderr
    module, qemu_module, version, *_ = proc.stdout.split()
    shim = ROOT / "jobcore" / "libvirt" / "shim"
    assert (module, qemu_module, version) == (
        str(shim / "libvirt.py"),
        str(shim / "libvirt_qemu.py"),
        "9000000",
    )
    check_client_output(run(xdg, DEBIAN_PYTHON, client(tmp_path), "sim:///default", "deb"))


def test_exit_status_and_arguments_pass_through(xdg: Path) -> None:
    proc = run(
        xdg, sys.executable, "-c", "import sys; print(sys.argv[1:]); sys.exit(7)", "-x", "--y"
    )
    assert proc.returncode == 7 and proc.stdout.strip() == "['-x', '--y']"
    prior = run(
        xdg,
        sys.executable,
        "-c",
        "import os; print(os.environ['PYTHONPATH'])",
        env={"PYTHONPATH": "/already/there"},
    )
    entries = prior.stdout.strip().split(os.pathsep)
    assert entries[0] == str(ROOT / "jobcore" / "libvirt" / "shim")
    assert entries[-1] == "/already/there"
    missing = run(xdg, "no-such-command-anywhere")
    assert missing.returncode == 127 and "command not found" in missing.stderr


PROPOSAL_BEGIN = """\
import libvirt
from jobcore.libvirt import proposals as P

dom = libvirt.open("sim:///slow?rate=1048576").lookupByName("vm1")
print(P.BlakeDomain(dom).backupBegin(
    "<domainbackup><disks><disk name='vda' type='file'><target file='/b/p.qcow2'/></disk>"
    "<disk name='vdb' backup='no'/></disks></domainbackup>"))
"""

PROPOSAL_END = """\
import sys
import libvirt
from jobcore.libvirt import proposals as P

ident = int(sys.argv[1])
dom = libvirt.open("sim:///slow").lookupByName("vm1")
blake, berrange = P.BlakeDomain(dom), P.BerrangeDomain(dom)
job = berrange.jobLookupByUUIDString(P.VIR_DOMAIN_JOB_LEGACY_UUID)
print(blake.jobStats()["id"] == ident, P.job_id(job._job.uuid) == ident,
      ("id=\\"%d\\"" % ident) in blake.backupGetXMLDesc(ident),
      blake.backupEnd(ident, P.VIR_DOMAIN_BACKUP_END_ABORT), job.info()[0])
"""


def test_proposal_ids_are_shared_by_every_client_of_jobd(tmp_path: Path, xdg: Path) -> None:
    """A Blake id one program got names the same job for the next program; Berrangé's
    legacy alias finds it too."""
    (tmp_path / "begin.py").write_text(PROPOSAL_BEGIN)
    (tmp_path / "end.py").write_text(PROPOSAL_END)
    with Jobd(xdg / "jobcore", env={"XDG_RUNTIME_DIR": str(xdg)}).wait_ready():
        began = run(xdg, sys.executable, str(tmp_path / "begin.py"))
        assert began.returncode == 0, began.stderr
        ident = int(began.stdout)
        ended = run(xdg, sys.executable, str(tmp_path / "end.py"), str(ident))
        assert ended.returncode == 0, ended.stderr
    # the job ended aborted: backupEnd 0, and the job object then reads CANCELLED (5)
    assert ended.stdout.split() == ["True", "True", "True", "0", "5"]


#: jobd dies under a client: libvirt's client fails at once and stays dead
JOBD_DIES = """\
import json
import os
import signal
import sys

import libvirt

libvirt.registerErrorHandler(f=lambda ctx, err: None, ctx=None)
libvirt.virEventRegisterDefaultImpl()
conn = libvirt.open("sim:///default")
closed = []
conn.registerCloseCallback(lambda c, reason, opaque: closed.append([reason, opaque]), "o")
dom = conn.lookupByName("vm1")
os.kill(int(open(sys.argv[1]).read().split()[0]), signal.SIGKILL)
errors = []
for call in (dom.info, lambda: conn.lookupByName("vm1")):
    while True:
        try:
            call()  # until the socket is seen closed (the kill is asynchronous)
        except libvirt.libvirtError as e:
            errors.append([e.get_error_code(), e.get_error_domain(), str(e)])
            break
libvirt.virEventAddTimeout(0, lambda timer, opaque: None, None)
while not closed:
    libvirt.virEventRunDefaultImpl()
print(json.dumps({"errors": errors, "closed": closed, "alive": conn.isAlive()}))
"""


def test_a_client_whose_jobd_dies_fails_at_once_as_libvirt(tmp_path: Path, xdg: Path) -> None:
    """libvirt's client neither waits nor reconnects when its daemon goes away: every call
    fails with VIR_ERR_SYSTEM_ERROR from VIR_FROM_RPC, the close callback hears EOF once
    and isAlive() is 0 (jobcore's own clients reconnect for up to 60 s; this one not)."""
    (tmp_path / "dies.py").write_text(JOBD_DIES)
    with Jobd(xdg / "jobcore", env={"XDG_RUNTIME_DIR": str(xdg)}) as jobd:
        jobd.wait_ready()
        pid_file = str(xdg / "jobcore" / "jobd.pid")
        proc = run(xdg, sys.executable, str(tmp_path / "dies.py"), pid_file, timeout=30)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [e[:2] for e in out["errors"]] == [[38, 7], [38, 7]]
    assert not any("did not come back" in e[2] for e in out["errors"]), out
    assert out["closed"] == [[1, "o"]] and out["alive"] == 0  # VIR_CONNECT_CLOSE_REASON_EOF
