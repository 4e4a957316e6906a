"""qpack's runtime: everything that runs inside the built executable.

Data flows one way: file -> reader (gguf) -> model/tokenizer -> engine -> CLI or server.
Nothing here imports qpack.builder.
"""

from .version import __version__

__all__ = ["__version__"]
