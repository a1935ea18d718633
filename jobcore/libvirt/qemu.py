"""libvirt-python's ``libvirt_qemu`` module: QEMU monitor and agent commands.

``qemuMonitorCommand(domain, cmd, flags)`` runs a QMP command (JSON text; returns the
JSON reply text) or, with VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP, an HMP command line
(returns its text), as libvirt-qemu offers it to admins and tests. The qemu driver only:
elsewhere VIR_ERR_NO_SUPPORT, as libvirt's test driver says.
"""

from __future__ import annotations

from jobcore.libvirt.constants import (
    VIR_DOMAIN_QEMU_AGENT_COMMAND_BLOCK,
    VIR_DOMAIN_QEMU_AGENT_COMMAND_DEFAULT,
    VIR_DOMAIN_QEMU_AGENT_COMMAND_MIN,
    VIR_DOMAIN_QEMU_AGENT_COMMAND_NOWAIT,
    VIR_DOMAIN_QEMU_AGENT_COMMAND_SHUTDOWN,
    VIR_DOMAIN_QEMU_MONITOR_COMMAND_DEFAULT,
    VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
)
from jobcore.libvirt.objects import virDomain

__all__ = [
    "VIR_DOMAIN_QEMU_AGENT_COMMAND_BLOCK",
    "VIR_DOMAIN_QEMU_AGENT_COMMAND_DEFAULT",
    "VIR_DOMAIN_QEMU_AGENT_COMMAND_MIN",
    "VIR_DOMAIN_QEMU_AGENT_COMMAND_NOWAIT",
    "VIR_DOMAIN_QEMU_AGENT_COMMAND_SHUTDOWN",
    "VIR_DOMAIN_QEMU_MONITOR_COMMAND_DEFAULT",
    "VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP",
    "qemuAgentCommand",
    "qemuMonitorCommand",
]


def qemuMonitorCommand(domain: virDomain, cmd: str, flags: int = 0) -> str:
    """Run ``cmd`` on ``domain``'s QEMU monitor (QMP JSON, or HMP with flag HMP)."""
    return domain._qemu_monitor_command(cmd, flags)


def qemuAgentCommand(domain: virDomain, cmd: str, timeout: int, flags: int) -> str:
    """jobcore's domains have no guest agent: libvirt's "not configured" error."""
    return domain._qemu_agent_command(cmd, timeout, flags)
