"""ua3d: training-free, guidance-driven upsampling of any low-resolution signal, lifted to 3D.

Core entry points: :func:`fit` (test-time optimisation of the kernel on a guide image),
:meth:`Kernel.render` (apply it to any LR signal), :func:`upsample` (both in one call).
"""

from importlib.metadata import PackageNotFoundError, version

from .api import Kernel, fit, upsample
from .core.tto import FitConfig

try:  # the one version number lives in pyproject.toml
    __version__ = version("ua3d")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
__all__ = ["FitConfig", "Kernel", "__version__", "fit", "upsample"]
