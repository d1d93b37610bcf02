"""Metrics as the paper defines them, subject-level calls, bootstrap intervals, and the colour baseline."""
