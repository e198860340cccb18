"""Built-in implementations, one module per provider. Importing a module registers its kernels."""
from fastrun.ops.builtin import ort, nchwc, gemm, conv_host, winograd, winograd_onnx, fft  # noqa: F401
