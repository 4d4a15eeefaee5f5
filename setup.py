"""Build the compiled core: Cython modules with OpenMP when the compiler has it.

Environment variables:
  CATTN_NO_OPENMP=1   build without OpenMP (serial kernels)
  CATTN_FAIL_NO_OPENMP=1  fail the build instead of falling back to serial kernels when
                      OpenMP is missing or disabled (CI and release builds set it)
  CATTN_CFLAGS="..."  extra compiler flags (for instance "-march=native"); the default
                      build targets the baseline of the platform and picks AVX2 at run time.
  CATTN_DEBUG=1       the debug build: the kernel checks that every read of its operands and
                      every write of an output row, lse entry, key-mass row or weights row
                      lies inside its array, and aborts naming the first that does not
                      (src/cattn_debug.h); C asserts stay on (no -DNDEBUG). Switching an
                      in-place build between the two needs `build_ext --inplace --force`.
  CATTN_EMULATE_ISA=1 the emulation build, for tests: the bfloat16 levels' instructions
                      (AVX512-BF16, AMX-BF16) and the VEX vpdpbusd in software on AVX-512
                      (src/cattn_emulate.h), so a CPU with AVX-512 but without them runs the
                      amx, avx512_bf16 and avx_vnni paths' logic. Slow; never for use.
"""
import glob
import os
import shlex
import sys
import tempfile
import textwrap

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))

OPENMP_PROBE = textwrap.dedent("""
    #include <omp.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        return omp_get_max_threads() > 0 && n > 0 ? 0 : 1;
    }
""")


def openmp_flags(compiler):
    """(compile flags, link flags) for OpenMP, or None when the compiler lacks it."""
    if os.environ.get("CATTN_NO_OPENMP"):
        return None
    if compiler.compiler_type == "msvc":
        candidates = [(["/openmp"], [])]
    elif sys.platform == "darwin":
        candidates = [(["-Xpreprocessor", "-fopenmp"], ["-lomp"]), (["-fopenmp"], ["-fopenmp"])]
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(OPENMP_PROBE)
        for cflags, ldflags in candidates:
            try:
                objs = compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
                compiler.link_executable(objs, "probe", output_dir=tmp, extra_postargs=ldflags)
                return cflags, ldflags
            except Exception:
                continue
    return None


# The encoder's row loops select with ?: around floating-point operations: GCC vectorizes
# them only when it may assume those operations do not trap (results are unchanged).
EXTRA_GCC_ARGS = {"cattn._encoder_ops": ["-fno-trapping-math"]}


class BuildExt(build_ext):
    def build_extensions(self):
        flags = openmp_flags(self.compiler)
        if flags is None and os.environ.get("CATTN_FAIL_NO_OPENMP"):
            raise RuntimeError(
                "cattn: no OpenMP (the compiler lacks it, or CATTN_NO_OPENMP is set), and "
                "CATTN_FAIL_NO_OPENMP=1 asks for a build that runs on several threads: "
                "install a compiler with OpenMP (gcc, or clang with libomp) or unset "
                "CATTN_FAIL_NO_OPENMP to build the serial kernels.")
        if flags is None:
            print("cattn: WARNING: no OpenMP support found in the compiler; building the "
                  "serial kernels (every call runs on one thread).", file=sys.stderr)
        extra_c = []
        if self.compiler.compiler_type != "msvc":
            extra_c = ["-O3", "-fno-math-errno", "-Wno-unused-function"]
        extra_c += shlex.split(os.environ.get("CATTN_CFLAGS", ""))
        debug = os.environ.get("CATTN_DEBUG", "") not in ("", "0")
        if debug:
            # Python's own flags carry -DNDEBUG; the debug build keeps C asserts on.
            for attribute in ("compiler", "compiler_so", "compiler_cxx"):
                command = getattr(self.compiler, attribute, None)
                if isinstance(command, list):
                    command[:] = [flag for flag in command if flag != "-DNDEBUG"]
        emulate = os.environ.get("CATTN_EMULATE_ISA", "") not in ("", "0")
        for ext in self.extensions:
            own = EXTRA_GCC_ARGS.get(ext.name, []) if self.compiler.compiler_type != "msvc" else []
            ext.extra_compile_args = extra_c + own + (flags[0] if flags else [])
            if debug:
                ext.define_macros = ext.define_macros + [("CATTN_DEBUG", "1")]
            if emulate:
                ext.define_macros = ext.define_macros + [("CATTN_EMULATE_ISA", "1")]
            ext.extra_link_args = list(flags[1]) if flags else []
        super().build_extensions()

# The C headers the compiled modules include: an edited header rebuilds them (Cython itself
# tracks only .pyx/.pxd files).
C_HEADERS = sorted(glob.glob("src/*.h"))

extensions = [
    Extension(
        "cattn._kernel",
        ["cattn/_kernel.pyx"],
        include_dirs=[os.path.join(HERE, "src"), numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        depends=C_HEADERS,
    ),
    # The BLAS the block GEMMs of some paths call, loaded from scipy when first needed.
    Extension("cattn._blas", ["cattn/_blas.pyx"]),
    # The validating front, plain Python compiled as is: its per-call bookkeeping would
    # otherwise cost more than the whole computation on a tiny input.
    Extension("cattn._plan", ["cattn/_plan.py"]),
    Extension("cattn._api", ["cattn/_api.py"]),
    Extension("cattn._varlen", ["cattn/_varlen.py"]),
    # The checks the front shares with the layers and models, compiled for the same reason.
    Extension("cattn._validation", ["cattn/_validation.py"]),
    # The encoder's fused row operations (GELU, residual + layer norm, pooling).
    Extension(
        "cattn._encoder_ops",
        ["cattn/_encoder_ops.pyx"],
        include_dirs=[os.path.join(HERE, "src"), numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        depends=C_HEADERS,
    ),
]

setup(
    ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}),
    cmdclass={"build_ext": BuildExt},
)
