"""leap_ds: LEAP learnable pruning for DeepSpeed.

    engine, optimizer, loader, scheduler = leap_ds.initialize(model=model, config="ds_config.json")
    ...                                   # the usual engine(batch) / engine.backward / engine.step loop
    print(leap_ds.report(engine)["global_density"])
    leap_ds.finalize(engine)              # masks into the weights; plain model again

Layers: :mod:`leap_ds.algorithm` (plain PyTorch), :mod:`leap_ds.integration`
(DeepSpeed), :mod:`leap_ds.apps` (training entry point, data, export, plots).
"""
from .algorithm import GroupRule, LeapConfigError, LeapPruner
from .integration.engine import attach, finalize, initialize, param_groups, report

__version__ = "0.1.0"
__all__ = ["initialize", "report", "finalize", "attach", "param_groups",
           "LeapPruner", "LeapConfigError", "GroupRule"]
