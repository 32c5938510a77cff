"""Student checkpoint -> clean ONNX (fp32, fp16, TensorRT-valid INT8) -> every runtime of the backend table
(ONNX Runtime, AOTInductor, TensorRT, OpenVINO, LiteRT, ExecuTorch), each verified against the PyTorch
student with the same gates and timed with the same protocol.

Only ``kdfast.checkpoint`` (and the standard-library ``kdfast.atomic``) are imported from kdfast
(docs/ARCHITECTURE.md, Layout); ``python -m export.trt`` is the command.
"""
