"""Data layer: C-NMC names and images, folder indexing, subject splits, synthetic cells, crops, transforms."""
