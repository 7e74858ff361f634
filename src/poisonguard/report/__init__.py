"""Reports: the canonical schema-versioned JSON, and HTML and console views rendered from it."""
