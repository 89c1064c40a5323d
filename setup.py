"""Builds the optional block kernel; everything else is configured in pyproject.toml.

The kernel (src/safemerge/merge/_blockops.c) makes the fuse's per-block pass one
vectorised loop. It is optional: where no C compiler is found the build goes on without
it, and safemerge runs the same arithmetic with torch ops (safemerge.merge.kernel).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "safemerge.merge._blockops",
            sources=["src/safemerge/merge/_blockops.c"],
            # No contraction into FMAs (the kernel has no multiplies, but the arithmetic
            # must stay the IEEE additions the torch fallback performs, whatever changes).
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math"],
            optional=True,
        )
    ]
)
