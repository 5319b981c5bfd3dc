"""The student under sharding: FSDP2 wrapping, running through its root, and gathering it back whole.

Which module is wrapped, and which is not, is the point here: only the trainable model the task owns (the student)
is sharded. A frozen teacher is held outside the task's module tree and never reaches these functions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def is_fsdp2(module: nn.Module) -> bool:
    """True once ``torch.distributed.fsdp.fully_shard`` has been applied to ``module``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def fully_shard_decoder(model: nn.Module, mesh: Any, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 over a transformers causal LM: one unit per decoder layer, the rest (embeddings, norm, head) in the root.

    Idempotent: Lightning calls ``configure_model`` again for ``validate`` after ``fit``.
    """
    from torch.distributed.fsdp import fully_shard

    if is_fsdp2(model):
        return model
    backbone = getattr(model, model.base_model_prefix)
    for layer in backbone.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    log.info("FSDP2: %d decoder layers + root sharded over %d ranks", len(backbone.layers), mesh.size())
    return model


def call_through_root(module: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` as ``module``'s forward when FSDP2 shards it, else call it directly.

    FSDP2 gathers a unit's parameters in that module's forward hooks. The KD loss calls the student's backbone and,
    chunk by chunk, its lm_head, never ``student(...)`` itself, so the root unit (embeddings, final norm, head) would
    stay sharded. Going through the root's ``__call__`` runs its hooks around the whole computation (Lightning
    redirects ``training_step`` through DeepSpeed/FSDP wrappers the same way).
    """
    if not is_fsdp2(module):
        return fn(*args)
    module.forward = fn  # instance attribute shadows the class's forward for this one call
    try:
        return module(*args)
    finally:
        del module.forward


def module_prefix(root: nn.Module, module: nn.Module) -> str:
    """``"student."`` for ``root.student``; the state-dict key prefix of ``module`` inside ``root``."""
    for name, candidate in root.named_modules():
        if candidate is module:
            return f"{name}." if name else ""
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(root).__name__}")


def _deepspeed_fp32_masters(trainer: Any, module: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]] | None:
    """The optimizer's fp32 master copy of ``module``'s weights (collective), or None without a ZeRO optimizer.

    Under ``bf16-mixed``/``16-mixed`` DeepSpeed trains 16-bit module weights from fp32 masters; these are what a
    checkpoint holds and what ``zero_to_fp32`` restores, so the saved student equals a converted checkpoint.
    Returns ``(state, frozen)``: frozen parameters have no master and are named in ``frozen`` instead.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    params = list(module.named_parameters())  # tied weights once; the same order on every rank
    if not all(getattr(p, "_z3_optimizer", None) is not None or hasattr(p, "_hp_mapping") for _, p in params):
        return None
    state, frozen = {}, []
    for name, p in params:
        full = safe_get_full_fp32_param(p) if p.requires_grad else None  # every rank takes part (collective)
        if full is None:
            frozen.append(name)
        elif trainer.is_global_zero:
            state[name] = full.detach().to("cpu", torch.float32, copy=True)
    return state, frozen


def gather_full_state_dict(trainer: Any, module: nn.Module) -> dict[str, torch.Tensor] | None:
    """``module``'s full weights on CPU on global rank 0 (None on other ranks), whatever the strategy.

    Every rank must call it (ZeRO and FSDP2 gather with collectives). DeepSpeed: the fp32 master weights (ZeRO-3
    without an optimizer: the engine's layer-by-layer 16-bit consolidation). FSDP2: torch's full state dict.
    DDP / one device: the module as it is.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = trainer.strategy
    state: dict[str, torch.Tensor] | None = None
    if is_fsdp2(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif isinstance(strategy, DeepSpeedStrategy):
        masters = _deepspeed_fp32_masters(trainer, module)
        state, frozen = masters if masters is not None else (None, None)
        if strategy.zero_stage_3 and (state is None or frozen):
            # no master copy (frozen weights, or no optimizer): the engine's layer-by-layer consolidation
            prefix = module_prefix(trainer.lightning_module, module)
            full = strategy.deepspeed_engine._zero3_consolidated_16bit_state_dict() or {}  # None off rank 0
            gathered = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
            state = gathered if state is None else {**gathered, **state}
        elif frozen and trainer.is_global_zero:  # ZeRO-1/2 never partition frozen weights: they are whole here
            state = {**{k: v.detach().cpu() for k, v in module.state_dict().items()}, **state}
    if state is None:
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()} if trainer.is_global_zero else {}
    return state if trainer.is_global_zero else None


def gathered_module(trainer: Any, module: nn.Module, rebuild: Callable[[dict[str, torch.Tensor]], nn.Module]):
    """The trained ``module`` as a plain, unsharded fp32-exact module on global rank 0 (None elsewhere).

    All ranks must call it. One device / DDP hand back ``module`` itself (no copy); DeepSpeed and FSDP2 call
    ``rebuild`` with the gathered weights (DeepSpeed: its fp32 masters, see above) for a fresh module of the same
    config, since the trained one only holds this rank's shards.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if not (is_fsdp2(module) or isinstance(trainer.strategy, DeepSpeedStrategy)):
        return module if trainer.is_global_zero else None
    state = gather_full_state_dict(trainer, module)
    return None if state is None else rebuild(state)


def gathered_student(trainer: Any, student: nn.Module) -> nn.Module | None:
    """:func:`gathered_module` for a transformers student, rebuilt from its config."""
    from autoglm_train.utils.sharded_checkpoint import student_from_state_dict

    return gathered_module(trainer, student, lambda state: student_from_state_dict(student.config, state))
