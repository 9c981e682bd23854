"""Components of gradient features: prepare, PCA / ICA / k-means, alignment with labels, directions in
parameter space and the Fisher they explain, plots."""

from .decompose import Alignment, Components, cluster, component_fishers, ica, pca, prepare

__all__ = ["Alignment", "Components", "cluster", "component_fishers", "ica", "pca", "prepare"]
