"""The pruning methods compared by benchmarks/quality.py, and the one training loop they share.

Every method trains the student with :func:`train_loop` (AdamW, linear warmup and decay, clipping,
the same batches for a given seed) on the same distillation loss; methods differ only in how they
choose and apply their masks. ``run_method`` is the entry point; each method is described in
:data:`LABELS` and in its function's docstring.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- what is pruned
PRUNABLE = re.compile(r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                      r"|intermediate\.dense|output\.dense)$")
# one FFN channel: its row of intermediate.dense and its column of output.dense, pruned together
FFN_CHANNELS = {"params": {"granularity": "channel"}, "modules": [r"encoder\.layer\.\d+\.output\.dense"],
                "related_modules": [r"encoder\.layer\.\d+\.intermediate\.dense"]}
ATTN_ALL = r"encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)$"
LEAP_GROUPS = {
    "unstructured": {
        "encoder": {"params": {"granularity": "unstructured"},
                    "modules": [PRUNABLE.pattern]},
    },
    "structured": {
        "attention": {"params": {"granularity": "head"},
                      "modules": [r"encoder\.layer\.\d+\.attention\.output\.dense"],
                      "related_modules": [r"attention\.self\.query", r"attention\.self\.key",
                                          r"attention\.self\.value"]},
        "ffn": FFN_CHANNELS,
    },
    "hybrid": {
        "attention": {"params": {"granularity": "unstructured"}, "modules": [ATTN_ALL]},
        "ffn": FFN_CHANNELS,
    },
}
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def prunable_modules(model):
    return [(n, m) for n, m in model.named_modules() if PRUNABLE.search(n)]


def count_density(model) -> tuple[float, int, int]:
    """(density, nonzero, total) over the prunable weight matrices: exact zeros counted."""
    nz = tot = 0
    for _, m in prunable_modules(model):
        nz += int((m.weight != 0).sum())
        tot += m.weight.numel()
    return nz / tot, nz, tot


def structured_plans(model):
    """leap_structured's groups (one per layer for heads, one for FFN channels), resolved by
    leap_ds's own planner without attaching anything: the units the structured baselines prune."""
    from leap_ds.algorithm.selection import plan_groups
    from leap_ds.integration.config import parse_leap_section
    section = parse_leap_section({"leap": {"shared_parameters": {"target_density": 0.5},
                                           "different_groups": LEAP_GROUPS["structured"]}})
    return plan_groups(model, section.rules())


# ----------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class LeapVariant:
    """One LEAP setting: which groups, which scores and how they start, how the thresholds learn.

    The issue-14 variants all use unstructured groups and learned scores, which the authors
    zero-initialise: while the density drops in the first ~50 steps the masks then keep
    whichever weights come first by index. Each variant attacks that differently; magnitude
    init won and is leap_ds's default ``score_init``.
    """
    groups: str = "unstructured"      # a LEAP_GROUPS entry
    score: str = "magnitude"          # "magnitude" (|W|, unit L2 norms) or "learned"
    score_init: str = "zero"          # learned: "zero" (the authors') or "magnitude" (leap_ds's default)
    times_magnitude: bool = False     # learned: rank by |W| (1 + s) instead of s
    threshold_freeze: float = 0.0     # thresholds frozen for this fraction of the steps
    matched_lr: bool = False          # thresholds and scores at one lr (--matched-lr)


LEAP_VARIANTS = {
    "leap_unstructured": LeapVariant(),
    "leap_structured": LeapVariant(groups="structured"),
    "leap_hybrid": LeapVariant(groups="hybrid"),
    "leap_learned": LeapVariant(score="learned"),
    "leap_learned_maginit": LeapVariant(score="learned", score_init="magnitude"),
    "leap_learned_x_mag": LeapVariant(score="learned", times_magnitude=True),
    "leap_learned_warmup": LeapVariant(score="learned", threshold_freeze=0.2),
    "leap_learned_matched_lr": LeapVariant(score="learned", matched_lr=True),
}
BASELINES = ["oneshot", "gmp", "movement", "soft_movement", "oneshot_structured", "gmp_structured"]
METHODS = BASELINES + list(LEAP_VARIANTS)
STRUCTURED_BASELINES = ("oneshot_structured", "gmp_structured")   # compared with leap_structured
LABELS = {
    "dense": "dense (teacher)",
    "oneshot": "one-shot magnitude",
    "gmp": "gradual magnitude (cubic)",
    "movement": "movement (top-k, cubic)",
    "soft_movement": "soft movement (sigmoid threshold, L1)",
    "oneshot_structured": "one-shot magnitude, heads + FFN channels",
    "gmp_structured": "gradual magnitude (cubic), heads + FFN channels",
    "leap_unstructured": "LEAP unstructured",
    "leap_structured": "LEAP structured (heads + FFN channels)",
    "leap_hybrid": "LEAP hybrid (unstructured attn + FFN channels)",
    "leap_learned": "LEAP learned scores (zero init)",
    "leap_learned_maginit": "LEAP learned scores (magnitude init)",
    "leap_learned_x_mag": "LEAP learned scores x magnitude",
    "leap_learned_warmup": "LEAP learned, thresholds frozen 20%",
    "leap_learned_matched_lr": "LEAP learned, matched threshold/score lr",
}
# soft movement's mask threshold tau goes from 0 to this (the authors' sigmoied_threshold runs)
SOFT_TAU_FINAL = 0.1


# ----------------------------------------------------------------------------- schedules
def warmup_steps(total: int) -> int:
    """The lr warmup: 10% of the steps (also soft movement's schedule unit, as in the authors' code)."""
    return max(1, total // 10)


def lr_factor(step: int, total: int) -> float:
    """Linear warmup over the first 10% of steps, then linear decay to 0 (step: 0-based)."""
    warm = warmup_steps(total)
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


def cubic_density(step: int, total: int, target: float, fraction: float) -> float:
    """Zhu & Gupta: d_t = d_f + (1 - d_f)(1 - t/T)^3 for t < T = fraction * total, then d_f."""
    end = max(1, int(round(fraction * total)))
    if step >= end:
        return target
    return target + (1.0 - target) * (1.0 - step / end) ** 3


def soft_movement_schedule(step: int, total: int, final_lambda: float) -> tuple[float, float]:
    """(tau, lambda) at a 0-based step, as the authors' schedule_threshold with initial_threshold 0,
    initial_warmup 1 and final_warmup 2 (in lr-warmup units): tau held at 0 for one warmup, cubic
    to SOFT_TAU_FINAL, held there for the last two warmups; lambda = final_lambda * tau / tau_final."""
    warm = warmup_steps(total)
    ramp = max(1, total - 3 * warm)
    if step <= warm:
        tau = 0.0
    elif step > total - 2 * warm:
        tau = SOFT_TAU_FINAL
    else:
        tau = SOFT_TAU_FINAL * (1.0 - (1.0 - (step - warm) / ramp) ** 3)
    return tau, final_lambda * tau / SOFT_TAU_FINAL


# ----------------------------------------------------------------------------- training loop
def train_loop(model, train, args, steps, *, loss_fn, groups, after_step=None, before_step=None,
               log_every=20, tag=""):
    """The same loop for every method: AdamW, linear warmup/decay of every group's lr (each group
    scaled from its own base lr, as leap_ds does for LEAP), clipping at 1.0 over every trainable
    parameter (as DeepSpeed's gradient_clipping does over the module's parameters). The batches
    and dropout follow args.seed."""
    from leap_ds.apps import device as placement
    from leap_ds.apps.batching import GlobalBatchSampler
    for g in groups:
        g.setdefault("weight_decay", 0.01)
        g["base_lr"] = g.get("leap_lr", g.get("lr", args.lr))
        g["lr"] = g["base_lr"]
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01)
    params = [p for g in groups for p in g["params"]]
    sampler = GlobalBatchSampler(len(train), args.batch_size, args.batch_size, 0, 1, seed=args.seed)
    history, step, tick = [], 0, time.time()
    while step < steps:
        sampler.set_epoch(step // sampler.steps_per_epoch, skip_steps=step % sampler.steps_per_epoch)
        for idx in sampler:
            model.train()
            if before_step:
                before_step(step)
            f = lr_factor(step, steps)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
            batch = placement.to_device(train[idx], placement.module_device(model))
            loss, extra = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            rec = after_step(step) if after_step else {}
            if step % log_every == 0 or step == steps or step == 1:
                rec = {"step": step, "loss": float(loss.detach()), "sec_per_step": (time.time() - tick) / max(1, step),
                       **extra, **(rec or {})}
                history.append(rec)
                print(f"[{tag}] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in rec.items()), flush=True)
            if step >= steps:
                break
    return history


def distill_loss_fn(teacher):
    from leap_ds.apps.distill import DistillConfig, distillation_loss
    cfg = DistillConfig()

    def fn(model, batch):
        inputs = {k: batch[k] for k in INPUTS if k in batch}
        out = model(**inputs, output_hidden_states=cfg.hidden)
        with torch.no_grad():
            t_out = teacher(**inputs, output_hidden_states=cfg.hidden)
        return distillation_loss(out, t_out, batch["labels"], cfg), {}
    return fn


# ----------------------------------------------------------------------------- magnitude baselines
def exact_topk(scores, k: int):
    """0/1 float tensor with exactly k ones on the highest scores: leap_ds's own selection (the
    same cost LEAP pays)."""
    from leap_ds.algorithm.mask import topk_indicator
    return topk_indicator(scores.detach(), k).to(scores.dtype)


def magnitude_mask(weight, density: float):
    """Per-matrix magnitude mask keeping round(density * n) largest |w|."""
    k = max(1, int(round(density * weight.numel())))
    return exact_topk(weight.detach().abs(), k)


def unstructured_masks(model):
    """density -> {weight: per-matrix magnitude mask} over the prunable matrices."""
    mods = [m for _, m in prunable_modules(model)]
    return lambda density: {m.weight: magnitude_mask(m.weight, density) for m in mods}


def units_kept_per_group(plans, density: float) -> list[int]:
    """Units each group keeps so that the kept weights come closest to density x all of them.
    Coarse groups (12 heads) go first, each keeping its share of what is left, so the fine ones
    (1,536 channels) absorb the rounding: every layer keeps about the same fraction."""
    sizes = [(p.members[0].layout.num_units, sum(m.layout.weights_per_unit for m in p.members)) for p in plans]
    to_keep = density * sum(n * w for n, w in sizes)
    left = sum(n * w for n, w in sizes)
    kept = [0] * len(plans)
    for i in sorted(range(len(plans)), key=lambda i: sizes[i][0]):
        n, w = sizes[i]
        kept[i] = min(n, max(1, round(to_keep / left * n)))
        to_keep -= kept[i] * w
        left -= n * w
    return kept


def structured_masks(model):
    """density -> {parameter: mask}: heads (Q, K, V rows and biases + attention-output columns) and
    FFN channels (intermediate row and bias + output column), the units of leap_structured's
    groups, kept by their L2 norm over all their weights."""
    plans = structured_plans(model)

    def masks_at(density):
        masks = {}
        for plan, k in zip(plans, units_kept_per_group(plans, density)):
            norms = sum(m.layout.unit_sq_norms(_logical_weight(m)) for m in plan.members)
            unit_mask = exact_topk(norms, k)
            for m in plan.members:
                lay = m.layout
                wmask = lay.expand(unit_mask).expand(lay.rows, lay.cols)
                masks[m.module.weight] = (wmask.t() if lay.transposed else wmask).contiguous()
                if m.module.bias is not None and lay.masks_bias:
                    masks[m.module.bias] = lay.bias_mask(unit_mask)
        return masks
    return masks_at


def _logical_weight(member):
    w = member.module.weight
    return w.t() if member.layout.transposed else w


def run_masked_finetune(model, teacher, train, args, target, tag, *, gradual: bool, masks_at):
    """One-shot (masks at the target from the teacher's weights, fixed) or gradual magnitude
    pruning (Zhu & Gupta: masks at the cubic schedule's density, recomputed every k steps from
    the current weights). ``masks_at(density) -> {parameter: 0/1 mask}``."""
    end = max(1, int(round(args.prune_fraction * args.steps)))
    interval = args.gmp_interval or max(1, end // 16)
    masks, state = {}, {"density": 1.0}

    @torch.no_grad()
    def remask(density):
        masks.clear()
        masks.update(masks_at(density))
        apply_masks()
        state["density"] = density

    @torch.no_grad()
    def apply_masks():
        for p, m in masks.items():
            p.mul_(m)

    def before(step):
        if not gradual:
            if step == 0:
                remask(target)
            return
        due = step % interval == 0 or step >= end
        if due and state["density"] != target:
            remask(cubic_density(step, args.steps, target, args.prune_fraction))

    def after(step):
        apply_masks()   # pruned weights stay exactly zero (their Adam updates are discarded)
        return {"mask_density": state["density"]}

    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    history = train_loop(model, train, args, args.steps, loss_fn=distill_loss_fn(teacher), groups=groups,
                         before_step=before, after_step=after, tag=tag)
    if gradual and state["density"] != target:   # a run shorter than the schedule's interval
        remask(target)
    return history


# ----------------------------------------------------------------------------- movement pruning
class TopKStraightThrough(torch.autograd.Function):
    """mask = 1 on the k highest scores; gradient passes straight through to the scores."""
    @staticmethod
    def forward(ctx, scores, k):
        return exact_topk(scores, k)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class SigmoidThresholdStraightThrough(torch.autograd.Function):
    """Soft movement pruning's mask (the authors' ThresholdBinarizer with sigmoid): 1 where
    sigmoid(S) > tau, and never fewer than 0.5% of the matrix (then its highest scores);
    gradient straight through to S."""
    @staticmethod
    def forward(ctx, scores, tau):
        mask = (torch.sigmoid(scores) > tau).to(scores.dtype)
        least = int(0.005 * scores.numel()) + 1
        if mask.sum() < least:
            mask = exact_topk(scores, least)
        return mask

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _mask_prunable_forwards(model, mask_of):
    """Every prunable linear computes with W * mask_of(module); returns the modules."""
    mods = [m for _, m in prunable_modules(model)]

    def make_forward(m):
        return lambda x: F.linear(x, m.weight * mask_of(m), m.bias)
    for m in mods:
        m.forward = make_forward(m)
    return mods


@torch.no_grad()
def _bake_masks(mods, mask_of):
    """Multiply the final masks into the weights and give the modules their own forward back."""
    for m in mods:
        m.weight.mul_(mask_of(m))
        m.__dict__.pop("forward", None)


def run_movement(model, teacher, train, args, target, tag):
    """Movement pruning with fixed-ratio top-k of learned scores (Sanh et al. 2020; DeepSpeed's old
    `topk`): W~ = W * TopK(S), dL/dS = dL/dW~ * W (straight-through), scores init 0, own lr
    (LEAP's score_lr), keep ratio per matrix following the cubic schedule."""
    state = {"density": 1.0}
    scores = {}

    def mask_of(m):
        return TopKStraightThrough.apply(scores[m], math.ceil(state["density"] * m.weight.numel()))
    mods = _mask_prunable_forwards(model, mask_of)
    scores.update({m: torch.nn.Parameter(torch.zeros_like(m.weight)) for m in mods})

    def before(step):
        state["density"] = cubic_density(step, args.steps, target, args.prune_fraction)

    groups = [{"params": [p for p in model.parameters() if p.requires_grad]},
              {"params": list(scores.values()), "lr": args.score_lr, "weight_decay": 0.0}]
    history = train_loop(model, train, args, args.steps, loss_fn=distill_loss_fn(teacher), groups=groups,
                         before_step=before, after_step=lambda s: {"mask_density": state["density"]}, tag=tag)
    state["density"] = target
    _bake_masks(mods, mask_of)
    return history


def run_soft_movement(model, teacher, train, args, final_lambda, tag):
    """Soft movement pruning (Sanh et al. 2020; the authors' `sigmoied_threshold` with
    `regularization l1`): a score S per weight (init 0), mask = sigmoid(S) > tau (straight-through),
    loss + lambda * mean over matrices of mean(sigmoid(S)); tau and lambda follow the authors'
    schedule (soft_movement_schedule). No target: the density comes out of lambda.

    Score lr: --soft-score-lr (default 0.1), not the authors' 1e-2. Their runs are ~50k steps;
    here Adam moves a score by at most about lr x 76 in 150 steps (warmup and decay), and at
    1e-2 that is 0.76: sigmoid(-0.76) = 0.32 > tau = 0.1, so nothing could ever be pruned."""
    state = {"tau": 0.0, "lambda": 0.0}
    scores = {}

    def mask_of(m):
        return SigmoidThresholdStraightThrough.apply(scores[m], state["tau"])
    mods = _mask_prunable_forwards(model, mask_of)
    scores.update({m: torch.nn.Parameter(torch.zeros_like(m.weight)) for m in mods})
    kd = distill_loss_fn(teacher)

    def loss_fn(model_, batch):
        loss, extra = kd(model_, batch)
        l1 = sum(torch.sigmoid(s).mean() for s in scores.values()) / len(scores)
        return loss + state["lambda"] * l1, {**extra, "l1": float(l1.detach())}

    def before(step):
        state["tau"], state["lambda"] = soft_movement_schedule(step, args.steps, final_lambda)

    @torch.no_grad()
    def after(step):
        kept = sum(int((torch.sigmoid(s) > state["tau"]).sum()) for s in scores.values())
        return {"tau": state["tau"], "lambda": state["lambda"],
                "mask_density": kept / sum(s.numel() for s in scores.values())}

    groups = [{"params": [p for p in model.parameters() if p.requires_grad]},
              {"params": list(scores.values()), "lr": args.soft_score_lr, "weight_decay": 0.0}]
    history = train_loop(model, train, args, args.steps, loss_fn=loss_fn, groups=groups,
                         before_step=before, after_step=after, tag=tag)
    state["tau"] = SOFT_TAU_FINAL
    _bake_masks(mods, mask_of)
    return history, {"soft_lambda": final_lambda}


# ----------------------------------------------------------------------------- LEAP
def leap_section(args, variant: LeapVariant, target: float):
    from leap_ds.integration.config import parse_leap_section
    shared = {**args.leap_shared, "target_density": target, "score": variant.score}
    if variant.score == "learned":   # x_mag ranks by |W| (1 + s): its s starts at zero
        shared["score_init"] = "zero" if variant.times_magnitude else variant.score_init
    if variant.matched_lr:
        shared["threshold_lr"] = shared["score_lr"] = args.matched_lr
    return parse_leap_section({"leap": {"shared_parameters": shared,
                                        "different_groups": LEAP_GROUPS[variant.groups]}})


def unit_magnitudes(handle):
    """L2 norm of every unit of a LEAP group over its matrices (|w| for one-weight units)."""
    return sum(m.layout.unit_sq_norms(_logical_weight(m)) for m in handle.members).sqrt()


@torch.no_grad()
def init_scores_from_magnitude(pruner):
    """Learned scores start at the units' magnitudes, scaled to mean 1 per group: the masks start
    as magnitude pruning's, and 150 steps of Adam at lr 1e-2 (at most ~0.8 of travel) re-rank the
    units near the cut rather than overturn the order."""
    for g in pruner.groups:
        if g.learned:
            mag = unit_magnitudes(g)
            g.module.scores.copy_(mag / mag.mean().clamp(min=1e-12))


def rank_by_magnitude_times_learned(pruner):
    """Each learned group ranks its units by |W| (1 + s) (the live weights' magnitude) instead of
    s; s starts at 0, so the masks start as magnitude pruning's. leap_ds ranks by whatever its
    group's `scores` parameter holds, so each call lends it the product (autograd carries
    dL/ds = dL/dscore x |W|); leap_ds itself is unchanged."""
    for g in pruner.groups:
        if not g.learned:
            continue
        rank_by_learned = g.module.forward

        def forward(*args, _handle=g, _rank=rank_by_learned, **kwargs):
            group = _handle.module
            learned = group._parameters["scores"]
            group._parameters["scores"] = unit_magnitudes(_handle) * (1 + learned)
            try:
                return _rank(*args, **kwargs)
            finally:
                group._parameters["scores"] = learned
        g.module.forward = forward


def run_leap(model, teacher, train, args, target, method, tag):
    import leap_ds
    variant = LEAP_VARIANTS[method]
    pruner = leap_ds.attach(model, leap_section(args, variant, target))
    if variant.score == "learned" and variant.score_init == "magnitude":
        init_scores_from_magnitude(pruner)
    if variant.times_magnitude:
        rank_by_magnitude_times_learned(pruner)
    groups = leap_ds.param_groups(model.parameters(), pruner)
    kd = distill_loss_fn(teacher)
    thresholds = list(pruner.parameters("threshold"))
    frozen_steps = int(round(variant.threshold_freeze * args.steps))

    def before(step):
        # a frozen threshold gets no gradient, so Adam skips it (its state does not fill up either)
        for p in thresholds:
            p.requires_grad_(step >= frozen_steps)

    def loss_fn(m, batch):
        loss, extra = kd(m, batch)
        return loss + pruner.regularization_loss(), extra

    def after(step):
        pruner.on_optimizer_step()
        return {"leap_density": pruner.report()["global_density"], "lambda": pruner.last_lambda}

    history = train_loop(model, train, args, args.steps, loss_fn=loss_fn, groups=groups,
                         before_step=before if frozen_steps else None, after_step=after, tag=tag)
    rep = pruner.report()
    pruner.finalize()
    return history, {"leap_reported_density": rep["global_density"], "leap_lambda": rep["lambda"],
                     "leap_groups": len(rep["groups"])}


# ----------------------------------------------------------------------------- dispatch
def run_method(method, student, teacher, train, args, point, tag):
    """Train ``student`` (in place) with ``method`` at ``point``: a target density, or soft
    movement's final lambda. Returns (history, extra record fields)."""
    if method in ("oneshot", "gmp"):
        return run_masked_finetune(student, teacher, train, args, point, tag, gradual=method == "gmp",
                                   masks_at=unstructured_masks(student)), {}
    if method in STRUCTURED_BASELINES:
        return run_masked_finetune(student, teacher, train, args, point, tag,
                                   gradual=method == "gmp_structured", masks_at=structured_masks(student)), {}
    if method == "movement":
        return run_movement(student, teacher, train, args, point, tag), {}
    if method == "soft_movement":
        return run_soft_movement(student, teacher, train, args, point, tag)
    return run_leap(student, teacher, train, args, point, method, tag)
