"""The ``netota`` command: one module per group of subcommands."""
