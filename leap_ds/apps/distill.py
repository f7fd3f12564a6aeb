"""Distillation loss of the LEAP recipes (../shared/LEAP_ALGORITHM.md):

    L = a_ce * CE + a_kd * [T^2 KL(softmax(z_t/T) || softmax(z_s/T)) + sum_l MSE(hid_s, hid_t)
                            (+ sum_l MSE(attn_s, attn_t) when attentions are returned)]
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DistillConfig:
    alpha_ce: float = 0.1
    alpha_kd: float = 0.9
    temperature: float = 2.0
    hidden: bool = True
    attention: bool = False


def distillation_loss(student, teacher, labels, cfg: DistillConfig) -> torch.Tensor:
    t = cfg.temperature
    ce = F.cross_entropy(student.logits.float(), labels)
    kd = F.kl_div(F.log_softmax(student.logits.float() / t, dim=-1),
                  F.softmax(teacher.logits.float() / t, dim=-1), reduction="batchmean") * t * t
    if cfg.hidden and student.hidden_states is not None:
        kd = kd + sum(F.mse_loss(s.float(), h.float()) for s, h in zip(student.hidden_states, teacher.hidden_states))
    if cfg.attention and student.attentions is not None:
        kd = kd + sum(F.mse_loss(s.float(), a.float()) for s, a in zip(student.attentions, teacher.attentions))
    return cfg.alpha_ce * ce + cfg.alpha_kd * kd
