"""alldetect: acute lymphoblastic leukemia detection with a weighted ensemble of CNNs."""

__version__ = "0.1.0"
