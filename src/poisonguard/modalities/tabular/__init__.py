"""The tabular modality (work in progress): so far only the validated loader (:mod:`.data`)."""

from poisonguard.modalities.tabular.data import TabularData, load_tabular

__all__ = ["TabularData", "load_tabular"]
