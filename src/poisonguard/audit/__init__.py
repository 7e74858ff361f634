"""Model audit (third layer): is a trained model backdoored, which class is the target, what
does the trigger look like, and can it be repaired? Works from the model and a small trusted
clean set, without the training data.

The package object is callable: ``poisonguard.audit(data=..., model=..., clean=...)`` runs the
full audit over every layer (:func:`poisonguard.full_audit.run_audit`)."""

import sys
import types
from typing import Any

from poisonguard.audit.anp import ANPConfig, anp_prune
from poisonguard.audit.core import AuditResult, audit_model, build_audit_report, make_verdict
from poisonguard.audit.dormant import DormantResult, dormant_neurons
from poisonguard.audit.model import AuditModel, load_audit_model, save_repaired
from poisonguard.audit.neural_cleanse import (
    CleanseConfig,
    CleanseResult,
    anomaly_index,
    neural_cleanse,
)
from poisonguard.audit.repair import RepairConfig, fine_prune, unlearn

__all__ = ["ANPConfig", "AuditModel", "AuditResult", "CleanseConfig", "CleanseResult",
           "DormantResult", "RepairConfig", "anomaly_index", "anp_prune", "audit_model",
           "build_audit_report", "dormant_neurons", "fine_prune", "load_audit_model",
           "make_verdict", "neural_cleanse", "save_repaired", "unlearn"]


class _CallableAudit(types.ModuleType):
    """``poisonguard.audit(...)`` is :func:`poisonguard.full_audit.run_audit`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from poisonguard.full_audit import run_audit

        return run_audit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableAudit
