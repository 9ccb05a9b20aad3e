"""The one compiled part of memnet (memnet/_scan.c): the int8 candidate pass of the exact
search and the nearest slots of small memories, built from source at install with the
system's C compiler; everything else is in pyproject.toml. It picks its instructions at run
time (AVX-512 VNNI, AVX2 or portable C), so one build serves every x86-64 CPU and other
architectures get the C path."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "memnet._scan",
            ["memnet/_scan.c"],
            # -ffp-contract=off: no fused multiply-add, so every path rounds alike.
            extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off"],
        )
    ]
)
