"""Components of gradient features: prepare, PCA / ICA / k-means, alignment with labels, directions in
parameter space and the Fisher they explain, plots."""

from .components import Alignment, Components, component_fishers
from .decompose import cluster, ica, pca
from .prepare import prepare

__all__ = ["Alignment", "Components", "cluster", "component_fishers", "ica", "pca", "prepare"]
