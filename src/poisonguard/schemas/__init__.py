"""Package data: JSON Schemas of the reports."""
