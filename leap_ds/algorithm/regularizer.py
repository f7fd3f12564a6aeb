"""Global density, the density regulariser and LEAP's adaptive coefficient."""
from __future__ import annotations

import torch


def global_density(keep_ratios: list[torch.Tensor], group_weights: list[int]) -> torch.Tensor:
    """R = sum_g sigmoid(theta_g) N_g / sum_g N_g (differentiable in the thresholds)."""
    total = float(sum(group_weights))
    return sum(r.reshape(()) * (n / total) for r, n in zip(keep_ratios, group_weights))


def density_regularizer(density: torch.Tensor, target_density: float) -> torch.Tensor:
    """L_reg = (R - R_t)^2 if R > R_t else 0."""
    return torch.relu(density - target_density).pow(2)


def adaptive_lambda(reg_loss: float, target_density: float, lambda_max: float = 20000.0,
                    lambda_floor: float = 10.0, lambda_min: float = 50.0,
                    tolerance: float = 3e-4) -> float:
    """lambda = 10 if L_reg < 3e-4 else max(50, lambda_max * L_reg / (1 - R_t)^2)."""
    if reg_loss < tolerance:
        return lambda_floor
    denom = max((1.0 - target_density) ** 2, 1e-12)
    return max(lambda_min, lambda_max * reg_loss / denom)
