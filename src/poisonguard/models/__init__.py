"""Models: small architectures, the torch adapter, the training loop, safe loading."""

from poisonguard.models.adapter import InputSpec, TorchClassifier
from poisonguard.models.architectures import build_model
from poisonguard.models.training import TrainConfig, train_classifier

__all__ = ["InputSpec", "TorchClassifier", "build_model", "TrainConfig", "train_classifier"]
