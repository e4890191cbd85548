"""CLI sub-commands: each module here is one ``moecraft <name>`` (see :mod:`moecraft.cli`)."""
