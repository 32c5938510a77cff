"""Student checkpoint -> clean ONNX (fp32, fp16, TensorRT-valid INT8) -> every runtime of the backend table
(ONNX Runtime, AOTInductor, TensorRT, OpenVINO, LiteRT, ExecuTorch), each verified against the PyTorch
student with the same gates and timed with the same protocol.

Of kdfast, export imports only ``kdfast.checkpoint`` (reading the student), ``kdfast.atomic`` (every file
written), ``kdfast.errors`` (one-line errors, exit codes), ``kdfast.schema`` (the export's config) and
``kdfast.quant`` (verifying a QAD student), never ``kdfast.train`` (docs/ARCHITECTURE.md, Layout).
``python -m export.trt`` is the command, ``python -m export.qad`` the PTQ-against-QAD comparison.
"""
