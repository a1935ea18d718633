"""Reference hypervisor drivers of jobcore: ``sim`` (embedded) and ``qemu`` (real QEMU)."""
