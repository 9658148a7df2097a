"""Data layer: discovery, extraction, cleaning, caching, targets, windows, splits."""
