"""How close a backend's result must be to the reference: one table for the tests, the benchmarks'
result checks and tools/sanitize_kernels.py.

TOL[dtype] = (atol, rtol) for op outputs and gradients at test sizes: the reference accumulates as
the kernels do (fp32, fp64 for fp64), so only the summation order and the final rounding differ.
Paper-scale results (sums over hundreds of channels or positions, gradients through them) are
compared at PAPER_SCALE times that.
"""
import torch

TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
PAPER_SCALE = 10.0


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> tuple:
    """(atol, rtol) for `dtype`, times `scale`."""
    atol, rtol = TOL[dtype]
    return atol * scale, rtol * scale
