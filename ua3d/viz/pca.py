"""Shared PCA colouring (re-exported: the one implementation is :mod:`ua3d.core.pca`, so that the point
clouds of :mod:`ua3d.rgbd.points` and every figure use the same PCA without importing upwards)."""

from ua3d.core.pca import PCABasis, flatten_features

__all__ = ["PCABasis", "flatten_features"]
