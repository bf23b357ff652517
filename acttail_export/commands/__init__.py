"""Subcommands of the ``acttail-export`` CLI: each module defines ``register(subparsers)``."""
