"""The streaming worker: Redis Streams in, memnet engine in the middle, responses out.

This package imports ``memnet``; ``memnet`` never imports it.
"""

import os

# One BLAS thread per worker process (set before numpy loads): several workers share the
# cores, and OpenBLAS's spinning threads turn 50 us products into 8 ms ones under load.
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, os.environ.get("MEMNET_BLAS_THREADS", "1"))
