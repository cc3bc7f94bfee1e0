"""One module per ``jaxfood`` subcommand (see :mod:`jaxfood.cli`)."""
