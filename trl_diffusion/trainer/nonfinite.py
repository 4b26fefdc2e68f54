"""Former home of the non-finite guard: its names stay importable from here.

The checks and [`NonFiniteError`][trl_diffusion.nonfinite.NonFiniteError] live in `trl_diffusion.nonfinite`, the
callback in `trl_diffusion.callbacks`.
"""

from ..callbacks import NonFiniteGuard
from ..nonfinite import HINT, NonFiniteError, all_finite, nonfinite_rows


__all__ = ["HINT", "NonFiniteError", "NonFiniteGuard", "all_finite", "nonfinite_rows"]
