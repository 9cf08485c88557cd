"""Network blocks, written once; no Lightning, no data."""
