"""Layer 2: LEAP inside a DeepSpeed engine.

- :mod:`config`  the ``compression_training.leap`` section (pydantic schema)
- :mod:`zero`    ZeRO-aware parameter access and all-reduce
- :mod:`engine`  ``initialize``, the engine hook, checkpoint state, ``report``, ``finalize``
"""
