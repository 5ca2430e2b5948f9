"""The bundled X2SAM-style trainer (see model/train.py)."""

import os

# Idle OpenMP threads sleep instead of spinning. On a 2-core machine shared with other processes, the
# default spin-wait made a training step ~15x slower (5.8 s vs 0.34 s measured). Only takes effect if
# torch is not imported yet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
