"""The IR: an ONNX model read, checked and simplified into nodes with concrete shapes."""
