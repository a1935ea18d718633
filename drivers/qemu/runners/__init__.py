"""The qemu driver's job runners: one module per job family, each mapping a jobcore job
onto QEMU jobs (``backup``: push, pull and checkpoints, with ``backup_checks``; ``chain``:
block pull and block commit; ``migration``). They share ``base.Runner`` and ask their
connection only what ``host.Host`` declares; ``drivers.qemu.connection`` picks the runner
for a job type from its table.
"""
