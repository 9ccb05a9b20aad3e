"""The streaming worker: Redis Streams in, memnet engine in the middle, responses out.

This package imports ``memnet``; ``memnet`` never imports it. Importing it changes nothing
process-wide: the ``memnet`` command sets its own process's defaults (one BLAS thread, JAX on
the CPU) in ``worker.cli.main``, through ``worker.settings.set_process_defaults``.
"""
