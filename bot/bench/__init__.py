"""``python -m bot bench``: speed figures, measured side by side in one run."""
