"""The ensemble as one ONNX graph, and its int8 copy calibrated on validation cells."""

INT8_TOLERANCE = 0.05  # largest mean change of a member's P(ALL), int8 against fp32, on the calibration cells
