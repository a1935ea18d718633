"""libvirt-python's ``libvirt_qemu`` module for programs run on jobcore."""

from jobcore.libvirt.qemu import *  # noqa: F403
from jobcore.libvirt.qemu import __all__  # noqa: F401
