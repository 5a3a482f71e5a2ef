"""Build the compiled core: _core/_core.pyx (+ .pxd) -> the extension broker._core.

The extension is required: there is no pure-Python fallback.

Cython finds a module's .pxd by the module's dotted name, so the sources are
compiled as the top-level module ``_core`` (finding ``_core/_core.pxd`` beside
the .pyx) and the resulting C is built as ``broker._core``.  Python calls the
init function by the last part of the name, ``PyInit__core``, so this works.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("BROKER_DEBUG") == "1"

(core,) = cythonize(
    [Extension("_core", ["_core/_core.pyx"])],
    compiler_directives={
        "language_level": "3",
        "boundscheck": DEBUG,
        "wraparound": False,
    },
)
core.name = "broker._core"
core.libraries = ["z"]
core.extra_compile_args = ["-O0", "-g"] if DEBUG else ["-O2"]

setup(ext_modules=[core])
