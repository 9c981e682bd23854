"""decomp: decompose pre-trained models into components from per-example gradients, and merge models.

The native core (decomp._C) holds the hot kernels; ``decomp.ops`` exposes them as torch operators and
``decomp.reference`` holds their pure-PyTorch counterparts (the test oracle and benchmark baseline).
"""

from . import ops, reference
from ._native import build_info

__version__ = build_info()["version"]

__all__ = ["ops", "reference", "build_info", "__version__"]
