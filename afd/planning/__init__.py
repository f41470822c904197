"""Planning a deployment: which hardware serves attention and which the experts, how many of each, how to batch.

- catalog.py: the hardware catalog (hardware.yaml: datasheet figures with sources, default prices, links);
- model_costs.py: a model's per-token bytes and FLOPs of each half, from its ModelSpec;
- calibration.py: what nodes measured (capacity profiles, `afd bench transport`), which the model is fitted to;
- cost_model.py: `predict(model, Mix) -> Prediction`, the API `afd plan` and `afd bench mix` share;
- planner.py: every candidate deployment of an inventory, ranked under a TPOT limit (`afd plan`);
- plan_file.py: the versioned plan.json that `afd up --plan` and `afd k8s render --plan` read.
"""

from afd.planning.cost_model import CostModel, CpuQuota, Link, Mix, Prediction, predict

__all__ = ["CostModel", "CpuQuota", "Link", "Mix", "Prediction", "predict"]
