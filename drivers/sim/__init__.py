"""``sim:///NAME``: the embedded simulated hypervisor, jobcore's reference driver.

Each connection owns a private simulated *world* of hosts; the host it opens holds two
running domains, ``vm1`` and ``vm2`` (disk ``vda``: 1 GiB, a 3-layer backing chain; disk
``vdb``: 512 MiB, no backing; 512 MiB of memory). Work advances at ``rate`` bytes/s of
simulated copying (``?rate=N``, default 256 MiB/s; ``rate=0`` means instant). With
``?clock=manual`` time moves only when a test calls ``clock.advance()``. Parameters are
checked when the connection opens (``rate`` finite and >= 0, ``fail_at`` in 0…1,
``clock`` real or manual): anything else is InvalidArgument naming it. ``sim:///`` (no
name) is refused. Migrations add hosts to the world, at most MAX_HOSTS in all.

Backup targets and scratch files follow libvirt's rule (design/xml.md): a file that exists
— a domain's disk image, an earlier backup's output, a file the host has (``files``), or a
real file at that path on this machine — is refused unless the job was begun with
VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL, and then it must have the target's format and the
disk's size. The simulation never writes real files: what a job creates goes into
``files``, and leaves it again when the job fails or is aborted (scratch files always).

Modules: ``world`` (hosts, domains, chains, checkpoints, files), ``job`` (a job's progress
over time, the Behaviour a family provides), ``backup``, ``chain``, ``migration`` (what each
family does to the world), ``clock``, ``persist`` (the world and the jobs in a
DriverState), ``connection`` (SimConnection, SimDriver).

Given a DriverState (``SimDriver.connect(uri, tg, state)``), a connection's world and jobs
outlive its process: the next connection with that state finds them, and ``recover_job``
moves each job on by the wall time since (design/sim.md).
"""

# The public names (the entry point drivers.sim:SimDriver, and what tests and messages name).
from drivers.sim.clock import ManualClock
from drivers.sim.connection import SimConnection, SimDriver
from drivers.sim.world import MAX_HOSTS

__all__ = ["MAX_HOSTS", "ManualClock", "SimConnection", "SimDriver"]
