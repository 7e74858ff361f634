"""poisonguard: find and remove data poisoning and backdoors in ML training sets and models.

``poisonguard.audit(...)`` (also ``poisonguard.run_audit``) runs every layer the inputs allow
and returns one verdict; see :func:`poisonguard.full_audit.run_audit`. ``poisonguard.audit`` is
also the model-audit subpackage (``from poisonguard.audit import audit_model`` keeps working):
the subpackage is callable, and calling it runs the full audit.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
SCHEMA_VERSION = "2.0"

__all__ = ["__version__", "SCHEMA_VERSION", "audit", "run_audit"]


def __getattr__(name: str) -> Any:
    """Import ``audit`` / ``run_audit`` on first use (they pull in torch)."""
    if name == "audit":
        import importlib

        return importlib.import_module("poisonguard.audit")
    if name == "run_audit":
        from poisonguard.full_audit import run_audit

        return run_audit
    raise AttributeError(f"module 'poisonguard' has no attribute {name!r}")
