"""The file contracts other tools rely on: manifests, predictions, problems reports, labels, CSV and tables."""
