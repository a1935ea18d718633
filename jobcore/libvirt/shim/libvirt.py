"""libvirt-python's ``libvirt`` module for programs run on jobcore: jobcore.libvirt's
public names (``python -m jobcore.libvirt --path`` puts this directory first)."""

from jobcore.libvirt import *  # noqa: F403
from jobcore.libvirt import __all__  # noqa: F401
