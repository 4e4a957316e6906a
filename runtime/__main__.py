"""`python -m qpack.runtime`, and the entry script of the frozen executable.

Absolute imports: PyInstaller runs this file as a top-level script, not as part of the package.
"""

import os
import sys

# numpy's OpenBLAS starts a thread per core when numpy loads; the runtime never hands numpy
# heavy linear algebra (its kernels have their own pool), so one thread is all it needs.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from qpack.runtime.main import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run())
