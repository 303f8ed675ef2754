"""Build the csev kernels. Metadata lives in pyproject.toml; this file only declares extensions.

Every ``csev/*.pyx`` is one extension module. Compiler directives live here and nowhere else.
``CSEV_DEBUG=1`` turns on bounds/initialisation checks and annotation.

No OpenSSL headers are needed: the crypto kernels declare the few EVP entry points they use as
function-pointer types and resolve them at import time from the libcrypto that Python's own
``_hashlib`` already loaded (csev/_libcrypto.pyx).
"""

import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("CSEV_DEBUG", "") not in ("", "0")

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "initializedcheck": DEBUG,
    "wraparound": False,
    "cdivision": True,
    "embedsignature": True,
    "freethreading_compatible": True,
}

# Generic x86-64 build: popcount/ctz get hardware instructions through GCC function
# multiversioning (target_clones in csev/_bitops.h), so one binary runs everywhere.
CFLAGS = ["-O0", "-g"] if DEBUG else ["-O3"]

# CSEV_MODULES=_bitmap,_xts builds only those (handy while developing one kernel family).
ONLY = {m for m in os.environ.get("CSEV_MODULES", "").split(",") if m}

extensions = [
    Extension(
        os.path.splitext(path)[0].replace(os.sep, "."),
        [path],
        include_dirs=["csev"],
        extra_compile_args=CFLAGS,
        libraries=["dl"],
    )
    for path in sorted(glob.glob(os.path.join("csev", "*.pyx")))
    if not ONLY or os.path.basename(path)[:-4] in ONLY
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=DIRECTIVES,
        annotate=DEBUG,
        nthreads=0,
    ),
)
