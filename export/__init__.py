"""Student checkpoint -> ONNX -> ONNX Runtime / TensorRT / AOTInductor, with parity and latency proven.

Only ``kdfast.checkpoint`` is imported from kdfast (DESIGN, Layout); ``python -m export.trt`` is the command.
"""
