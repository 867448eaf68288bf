"""The ``coformer-runtime`` command's subcommands, one module each, as :mod:`coformer.tools.commands`.

Each module's ``register(sub)`` adds its parsers and sets the function that runs each
(``args.run``); :mod:`coformer.runtime.commands.args` holds the argument groups they share.
Nothing here imports an engine, a socket or numpy's heavier users while the parser is built:
a role's start-up stays light.
"""

from coformer.runtime.commands import bundle, device, infer, roles, timing

# the order `coformer-runtime --help` lists them in
COMMANDS = (roles, infer, timing, device, bundle)
