"""``python -m jobcore.cli``: the jobctl command."""

from jobcore.cli.fast import main

if __name__ == "__main__":
    main(prog_name="jobctl")
