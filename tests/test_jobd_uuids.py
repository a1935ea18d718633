"""One caller-chosen job UUID names at most one job in a jobd, whichever driver connection
(host) it is begun on: a duplicate on another host is refused, naming the host that has it."""

from __future__ import annotations

import uuid
from pathlib import Path

from jobd_helpers import Jobd, RawClient

U = uuid.UUID("0b3c0000-0000-4000-8000-000000000001")
JOB = (
    f"<job type='backup'><uuid>{U}</uuid><domainbackup><disks><disk name='vdb'/></disks>"
    "</domainbackup></job>"
)


def _client(daemon: Jobd, host: str) -> RawClient:
    return RawClient.ready(daemon.sock, f"sim:///{host}?rate=1")


def test_one_uuid_names_one_job_across_hosts(tmp_path: Path) -> None:
    daemon = Jobd(tmp_path / "run").wait_ready()
    try:
        with _client(daemon, "hosta") as a, _client(daemon, "hostb") as b:
            assert a.call("job_begin", "vm1", JOB, 0)[0] == 1
            refused = b.call("job_begin", "vm1", JOB, 0)
            assert refused[0] == 2 and refused[2] == "InvalidArgument", refused
            assert f"a job with UUID '{U}' already exists (on 'sim:///hosta')" in str(refused[3])
            # the refused begin left no job on hostb; the UUID names hosta's job
            # daemon-wide, so hostb's session finds that one (design/daemon.md)
            assert b.call("list_jobs", "vm1")[2] == []
            found = b.call("lookup_job", U.bytes)
            assert found[0] == 1 and found[2][1:] == ["backup", "vm1", "running"], found
            # a fresh UUID still begins on hostb; the refused one left no reservation behind
            other = JOB.replace(str(U), str(uuid.uuid4()))
            assert b.call("job_begin", "vm1", other, 0)[0] == 1
            assert a.call("job_abort", U.bytes)[0] == 1
    finally:
        daemon.stop()
