"""The ensemble as one ONNX graph, and its int8 copy calibrated on validation cells."""
