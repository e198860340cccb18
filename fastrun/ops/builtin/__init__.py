"""Built-in implementations, one module per provider. Importing a module registers its kernels."""
from fastrun.ops.builtin import ort, nchwc, gemm, conv_host, winograd, fft  # noqa: F401
