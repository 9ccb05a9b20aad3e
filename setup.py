"""The compiled parts of memnet, built from source at install with the system's C compiler
(everything else is in pyproject.toml): memnet/_scan.c, the int8 candidate pass of the
exact search and the nearest slots of small memories, which picks its instructions at run
time (AVX-512 VNNI, AVX2 or portable C), so one build serves every x86-64 CPU and other
architectures get the C path; and memnet/_rows.c, the types of a small memory's handle and
of the engine's events and answers, which Python's cyclic garbage collector does not track."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "memnet._scan",
            ["memnet/_scan.c"],
            # -ffp-contract=off: no fused multiply-add, so every path rounds alike.
            extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off"],
        ),
        Extension("memnet._rows", ["memnet/_rows.c"], extra_compile_args=["-O2", "-std=gnu11"]),
    ]
)
