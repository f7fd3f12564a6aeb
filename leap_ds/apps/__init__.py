"""Layer 3: applications built on leap_ds (training entry point, data, export, plots)."""
