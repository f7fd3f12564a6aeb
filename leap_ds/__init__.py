"""leap_ds: LEAP learnable pruning for DeepSpeed.

    engine, optimizer, loader, scheduler = leap_ds.initialize(model=model, config="ds_config.json")
    ...                                   # the usual engine(batch) / engine.backward / engine.step loop
    print(leap_ds.report(engine)["global_density"])
    leap_ds.finalize(engine)              # masks into the weights; plain model again

Layers: :mod:`leap_ds.algorithm` (plain PyTorch), :mod:`leap_ds.integration`
(DeepSpeed), :mod:`leap_ds.export` (compact models), :mod:`leap_ds.apps` (training entry point, data, export, plots).
The DeepSpeed-facing names load on first use, so ``leap_ds.algorithm`` works
without importing DeepSpeed.
"""
from .algorithm import GroupRule, LeapConfigError, LeapPruner, LeapUsageError

__version__ = "0.1.0"
_ENGINE_API = ("initialize", "report", "finalize", "attach", "param_groups", "follow_optimizer",
               "regularization_loss", "pruner_of")
_EXPORT_API = ("compact", "save_compact", "load_compact")
__all__ = [*_ENGINE_API, *_EXPORT_API, "LeapPruner", "LeapConfigError", "LeapUsageError", "GroupRule"]


def __getattr__(name):
    if name in _ENGINE_API:
        from .integration import engine
        return getattr(engine, name)
    if name in _EXPORT_API:
        from . import export
        return getattr(export, name)
    raise AttributeError(f"module 'leap_ds' has no attribute {name!r}")
