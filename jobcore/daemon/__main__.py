"""``python -m jobcore.daemon``: the ``jobd`` command."""

from jobcore.daemon.main import main

main(prog_name="jobd")
