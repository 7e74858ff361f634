"""Guarded training: trimmed loss, anti-backdoor learning (ABL), gradient-norm monitoring."""

from poisonguard.train.guarded import GuardConfig, GuardedResult, train_guarded
from poisonguard.train.monitor import GradientNormMonitor

__all__ = ["GuardConfig", "GuardedResult", "GradientNormMonitor", "train_guarded"]
