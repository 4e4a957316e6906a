"""The one place the version lives: the packer, the stub cache and `--version` read it."""

__version__ = "0.1.0"
