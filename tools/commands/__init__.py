"""The ``coformer`` command's subcommands, one module each (Polygraphy's ``tools/`` is the model).

Each module's ``register(sub)`` adds its parser to the subparsers ``sub`` and sets the function
that runs it (``args.run``); :mod:`coformer.tools.commands.args` holds the argument groups they
share. A new command is a new module here and one entry in :data:`COMMANDS`.
"""

from coformer.tools.commands import bench, compile, profile, quickstart, serve, testbed

# the order `coformer --help` lists them in
COMMANDS = (quickstart, compile, profile, testbed, bench, serve)
