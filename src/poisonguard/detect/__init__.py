"""Data-side detectors (activation clustering, spectral signatures, loss outliers, SCAn,
SPECTRE) and the cross-reference that combines them. Every detector returns a
:class:`DetectorResult`."""

from poisonguard.detect.activation_clustering import ActivationClustering
from poisonguard.detect.crossref import CrossReference, cross_reference
from poisonguard.detect.loss_outliers import LossOutliers
from poisonguard.detect.scan_decomposition import SCAn
from poisonguard.detect.spectral import SpectralSignatures
from poisonguard.detect.spectre import Spectre

__all__ = ["SCAn", "ActivationClustering", "CrossReference", "LossOutliers",
           "Spectre", "SpectralSignatures", "cross_reference"]
