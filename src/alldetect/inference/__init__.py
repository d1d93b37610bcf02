"""Scoring with a built ensemble: one engine interface over torch and ONNX, predictions files and Grad-CAM."""
