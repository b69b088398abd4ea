"""The `rgbt-seg` subcommands, one module each with `add_arguments(parser)` and `run(args)` (see cli.py)."""
