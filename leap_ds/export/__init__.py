"""Export: physically smaller models from structured LEAP (imports algorithm and integration,
never the reverse).

- :mod:`shrink`   remove pruned head / channel units from a plain model, exactly
- :mod:`compact`  ``compact``: from an engine / model with LEAP (any ZeRO stage) or a masked directory
- :mod:`storage`  ``save_compact`` / ``load_compact``
- :mod:`job`      ``export_compact``: what the main job writes and reports (import it from there)
"""
from .compact import compact, compact_directory, parameter_count
from .storage import COMPACT_FILE, load_compact, save_compact

__all__ = ["compact", "compact_directory", "parameter_count", "save_compact", "load_compact", "COMPACT_FILE"]
