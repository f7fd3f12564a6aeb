"""Global density, the density regulariser and LEAP's adaptive coefficient."""
from __future__ import annotations

import math

import torch

# The paper switches lambda to its floor when L_reg < 3e-4, i.e. R - R_t < sqrt(3e-4)
DEFAULT_DENSITY_TOLERANCE = math.sqrt(3e-4)


def global_density(keep_ratios: list[torch.Tensor], group_weights: list[int]) -> torch.Tensor:
    """R = sum_g r_g N_g / sum_g N_g for keep ratios r_g (LeapGroup gives the exact
    kept fraction with sigmoid(theta_g)'s gradient)."""
    total = float(sum(group_weights))
    return sum(r.reshape(()) * (n / total) for r, n in zip(keep_ratios, group_weights))


def density_regularizer(density: torch.Tensor, target_density: float,
                        two_sided: bool = False) -> torch.Tensor:
    """L_reg = (R - R_t)^2 if R > R_t else 0 (the paper); two-sided: (R - R_t)^2 always."""
    gap = density - target_density
    return (gap if two_sided else torch.relu(gap)).pow(2)


def adaptive_lambda(reg_loss: float, target_density: float, lambda_max: float = 20000.0,
                    lambda_floor: float = 10.0, lambda_min: float = 50.0,
                    density_tolerance: float = DEFAULT_DENSITY_TOLERANCE) -> float:
    """lambda = 10 if L_reg < tol^2 else max(50, lambda_max * L_reg / (1 - R_t)^2);
    tol^2 = 3e-4 in the paper."""
    if reg_loss < density_tolerance ** 2:
        return lambda_floor
    denom = max((1.0 - target_density) ** 2, 1e-12)
    return max(lambda_min, lambda_max * reg_loss / denom)
