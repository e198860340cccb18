"""Process and machine: onnxruntime session options, OpenBLAS threads, malloc, host threads, the fingerprint (the bottom layer)."""
