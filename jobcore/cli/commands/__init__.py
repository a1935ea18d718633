"""jobctl's commands, one module per group: jobs, domains, events, daemon, explain (the root group
in ``jobcore.cli.app`` imports a module only when one of its commands runs)."""
