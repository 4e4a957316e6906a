"""`python -m qpack.runtime`, and the entry script of the frozen executable.

Absolute imports: PyInstaller runs this file as a top-level script, not as part of the package.
"""

import sys

from qpack.runtime.main import run

if __name__ == "__main__":
    sys.exit(run())
