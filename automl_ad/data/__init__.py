"""Data layer: MVTec-AD-style folders, the built-in products, and cached tensors."""
