"""Make OpenMP workers sleep, not spin, while they wait; import before torch.

libgomp (torch's OpenMP) reads ``OMP_WAIT_POLICY`` once, when torch is first imported. Its
default spins idle workers; on a machine whose cores are shared with other busy processes, a
spinning worker holds a core that its peer needs, so every parallel region can wait a whole
scheduler slice. On the shared 2-core development machine that made 2-thread scoring ~10x
slower and the timings meaningless. ``PASSIVE`` costs a few microseconds per region when the
machine is idle. An explicit ``OMP_WAIT_POLICY`` in the environment wins.
"""

from __future__ import annotations

import os
import sys

TORCH_LOADED_FIRST = "torch" in sys.modules
"""True when torch was imported before this module, so the policy below did not apply."""

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def effective_policy() -> str:
    """The wait policy libgomp runs with in this process."""
    if TORCH_LOADED_FIRST:
        return "default (torch was imported first)"
    return os.environ["OMP_WAIT_POLICY"]
