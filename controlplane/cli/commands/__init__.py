"""One module per command group; each adds its parsers to the CLI with ``register``."""
