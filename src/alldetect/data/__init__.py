"""Data layer: C-NMC discovery, manifests, subject splits, synthetic cells, transforms and datasets."""
