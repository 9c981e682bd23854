"""The native kernels (``ops``) and what they share: validation, the native loader, the counter-based hash.

Nothing here imports the rest of decomp. ``reference`` (the pure-PyTorch oracle) is not imported by this package.
"""

from . import ops

__all__ = ["ops"]
