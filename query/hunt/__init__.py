"""scatlas package."""
