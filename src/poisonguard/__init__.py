"""poisonguard: find and remove data poisoning and backdoors in ML training sets and models."""

__version__ = "0.1.0"
SCHEMA_VERSION = "1.0"

__all__ = ["__version__", "SCHEMA_VERSION"]
