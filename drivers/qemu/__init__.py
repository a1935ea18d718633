"""The qemu driver: ``qemu:///session`` drives real QEMU processes over QMP.

One QEMU process per domain (``-machine none``), started and owned by the driver; block
jobs, NBD pull backups and migrations run for real. asyncio only (qemu.qmp is asyncio).
"""

from drivers.qemu.connection import QemuConnection, QemuDriver, keep_guests_by_default

__all__ = ["QemuConnection", "QemuDriver", "keep_guests_by_default"]
