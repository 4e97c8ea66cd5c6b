"""The optimizer and its learning-rate schedule: AdamW for every weight, or Muon for the blocks' matrices beside AdamW.

    adamw: one AdamW, weight decay on tensors of two or more dims (matmuls, embeddings), none on biases and gains.
    muon:  torch.optim.Muon for the transformer blocks' 2-D weight matrices (attention and MLP), AdamW for the
           embeddings (and the head tied to them), biases and LayerNorm gains; each with its own learning rate,
           stepped as one optimizer (MuonWithAdamW) so that Lightning, checkpoints and the LR schedule see one.
Schedules (a multiplier of each group's peak rate, per optimizer step): linear warmup, then a cosine down to
min_lr ("cosine"), or a constant rate with a linear cool-down over the last cooldown_fraction ("wsd").
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Literal, Optional

import torch

from nanogpt.errors import NanoGPTError
from nanogpt.model import setting

OptimizerName = Literal["adamw", "muon"]
ScheduleName = Literal["cosine", "wsd"]


def warmup_cosine(step: int, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """LR multiplier at an optimizer step: linear warmup, then cosine decay to min_ratio, then flat."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)


def warmup_stable_decay(
    step: int, warmup_steps: int, decay_steps: int, min_ratio: float, cooldown_fraction: float
) -> float:
    """LR multiplier: linear warmup, then 1 until the last cooldown_fraction of decay_steps, then a straight line
    down to min_ratio at decay_steps, then flat (warmup-stable-decay)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_ratio
    cooldown_start = max(warmup_steps, decay_steps - round(cooldown_fraction * decay_steps))
    if step < cooldown_start:
        return 1.0
    progress = (step - cooldown_start) / max(1, decay_steps - cooldown_start)
    return 1.0 - progress * (1.0 - min_ratio)


@dataclass
class OptimizerSettings:
    """GPTModule's optimizer arguments (see its docstring for each); their defaults are GPTModule's.

    Mark: restored, the checkpoint's optimizer state holds it, so a resumed run cannot change it (nanogpt.training.resume).
    """

    optimizer: OptimizerName = setting("adamw", restored=True)
    learning_rate: float = setting(1e-3, restored=True)
    min_lr: float = 1e-4
    weight_decay: float = setting(0.1, restored=True)
    beta1: float = setting(0.9, restored=True)
    beta2: float = setting(0.99, restored=True)
    muon_lr: float = setting(0.02, restored=True)
    muon_momentum: float = setting(0.95, restored=True)
    muon_weight_decay: float = setting(0.0, restored=True)
    muon_ns_steps: int = setting(5, restored=True)
    schedule: ScheduleName = "cosine"
    warmup_steps: int = 100
    decay_steps: Optional[int] = None
    cooldown_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.learning_rate <= 0 or self.min_lr < 0 or self.min_lr > self.learning_rate:
            raise NanoGPTError(
                f"need 0 <= model.min_lr <= model.learning_rate and learning_rate > 0, "
                f"got {self.min_lr} and {self.learning_rate}"
            )
        if self.muon_lr <= 0 or self.muon_momentum < 0 or self.muon_weight_decay < 0:
            raise NanoGPTError(
                f"need model.muon_lr > 0, model.muon_momentum >= 0 and model.muon_weight_decay >= 0, got "
                f"{self.muon_lr}, {self.muon_momentum} and {self.muon_weight_decay}"
            )
        if self.muon_ns_steps < 1:
            raise NanoGPTError(f"model.muon_ns_steps must be at least 1, got {self.muon_ns_steps}")
        if not 0.0 <= self.cooldown_fraction <= 1.0:
            raise NanoGPTError(f"model.cooldown_fraction must be between 0 and 1, got {self.cooldown_fraction}")


def parameter_roles(model: torch.nn.Module, optimizer: OptimizerName) -> dict[str, str]:
    """Each parameter's name -> "muon", "decay" or "no_decay", decided on the true shapes.

    Taken when the model is built: under FSDP the optimizer later sees parameters flattened into 1-D shards.
    Muon takes the 2-D weights inside the transformer blocks (transformer.h.*); AdamW everything else, with weight
    decay on the tensors of two or more dims (the embeddings, which the head shares) only.
    """
    roles = {}
    for name, p in model.named_parameters():
        if optimizer == "muon" and p.dim() == 2 and name.startswith("transformer.h."):
            roles[name] = "muon"
        else:
            roles[name] = "decay" if p.dim() >= 2 else "no_decay"
    return roles


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon and torch.optim.AdamW stepped as one optimizer.

    param_groups are the AdamW groups followed by the Muon groups: the same dicts the two optimizers read, so an
    LR scheduler setting a group's "lr" sets it where it is used. Both share one state dict (parameters are
    disjoint), so state_dict() is a plain optimizer state dict and Lightning moves and saves the state as usual.
    It does not skip steps on the device (no `found_inf`, Muon has no such input): NonFiniteGuard checks a
    non-finite gradient norm before the step instead (a float read on a CPU, one host sync a step on a GPU).
    """

    def __init__(self, adamw: torch.optim.AdamW, muon: torch.optim.Optimizer) -> None:
        self.adamw, self.muon = adamw, muon
        super().__init__([*adamw.param_groups, *muon.param_groups], defaults={})
        self._share_state()

    def _share_state(self) -> None:
        """One state dict and one list of groups, seen alike by this optimizer and the two inside it."""
        state: defaultdict[torch.Tensor, Any] = defaultdict(dict)
        state.update(self.adamw.state)
        state.update(self.muon.state)
        self.state = self.adamw.state = self.muon.state = state
        self.param_groups = [*self.adamw.param_groups, *self.muon.param_groups]

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.adamw.step()
        self.muon.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # split by group (the saved ids of each optimizer's groups, with their states) and let each optimizer cast
        # its own state as it would alone (AdamW keeps a fused step count on the parameter's device, for example)
        groups = state_dict["param_groups"]
        n_adamw = len(self.adamw.param_groups)
        if len(groups) != n_adamw + len(self.muon.param_groups):
            raise ValueError(f"the state holds {len(groups)} parameter groups, this optimizer {len(self.param_groups)}")
        for optimizer, own in ((self.adamw, groups[:n_adamw]), (self.muon, groups[n_adamw:])):
            ids = {i for group in own for i in group["params"]}
            state = {i: s for i, s in state_dict["state"].items() if i in ids}
            optimizer.load_state_dict({"state": state, "param_groups": own})
        self._share_state()


def build_optimizer(
    named: list[tuple[str, torch.nn.Parameter]], roles: dict[str, str], s: OptimizerSettings, device: torch.device
) -> torch.optim.Optimizer:
    """The optimizer for the named trainable parameters (names as in parameter_roles)."""
    # fused: one kernel for all tensors (3-5x faster than the per-tensor loop on a CPU too), and it can skip a
    # step with non-finite gradients on the device (NonFiniteGuard) where others would need a host sync
    fused = device.type in ("cuda", "cpu")
    # a name parameter_roles did not see (a FlatParameter of FSDP's) gets no weight decay, as before
    groups = [
        {"params": [p for name, p in named if roles.get(name) == "decay"], "weight_decay": s.weight_decay},
        {"params": [p for name, p in named if roles.get(name) not in ("decay", "muon")], "weight_decay": 0.0},
    ]
    adamw = torch.optim.AdamW(groups, lr=s.learning_rate, betas=(s.beta1, s.beta2), fused=fused)
    if s.optimizer == "adamw":
        return adamw
    matrices = [(name, p) for name, p in named if roles.get(name) == "muon"]
    flat = [(name, tuple(p.shape)) for name, p in named if roles.get(name, "muon") == "muon" and p.dim() != 2]
    if flat:
        raise NanoGPTError(
            f"--model.optimizer muon needs whole 2-D weight matrices, but {flat[0][0]} has shape {flat[0][1]} here "
            "(FSDP flattens and shards them): use --model.optimizer adamw with FSDP, or DDP"
        )
    muon = torch.optim.Muon(
        [p for _, p in matrices],
        lr=s.muon_lr,
        momentum=s.muon_momentum,
        weight_decay=s.muon_weight_decay,
        ns_steps=s.muon_ns_steps,
    )
    return MuonWithAdamW(adamw, muon)


class ScheduleLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose schedule, not the checkpoint's optimizer state, sets the rate of the step a run resumes at.

    The optimizer state restores the LR the checkpoint's schedule gave that step; a resumed run's schedule may differ
    (decay_steps unset and a larger max_steps re-stretch the cosine; a new min_lr or warmup_steps), and without this
    its first step would still train at the old value. With an unchanged schedule the value is the same.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group, base_lr, fn in zip(self.optimizer.param_groups, self.base_lrs, self.lr_lambdas):
            group["lr"] = base_lr * fn(self.last_epoch)  # LambdaLR's own formula for the step at last_epoch


def build_schedule(
    optimizer: torch.optim.Optimizer, s: OptimizerSettings, max_steps: int
) -> ScheduleLR:
    """The LR schedule, stepped once per optimizer step: each group's peak rate times the schedule's multiplier.

    The multiplier falls to min_lr / learning_rate at decay_steps (default: max_steps), in every group: Muon's rate
    ends at the same fraction of muon_lr.
    """
    decay_steps = s.decay_steps or max_steps
    if decay_steps <= 0:  # max_steps -1: training has no set end for the schedule to reach
        raise NanoGPTError(
            "the learning-rate schedule needs an end: set --trainer.max_steps, or --model.decay_steps "
            "(the step where the schedule reaches model.min_lr)"
        )
    common = {"warmup_steps": s.warmup_steps, "decay_steps": decay_steps, "min_ratio": s.min_lr / s.learning_rate}
    if s.schedule == "cosine":
        multiplier = partial(warmup_cosine, **common)
    else:
        multiplier = partial(warmup_stable_decay, **common, cooldown_fraction=s.cooldown_fraction)
    return ScheduleLR(optimizer, multiplier)
