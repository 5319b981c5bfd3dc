"""The student, built inside ``configure_model``: never whole on every rank when the strategy shards it.

Lightning calls ``configure_model`` inside the strategy's own contexts, so one factory serves every ``trainer=``:

* one device, DDP, ZeRO-1/2: built on the rank's device directly (``tensor_init_context``), no host copy;
* ZeRO-3: DeepSpeed's ``zero.Init`` (``model_sharded_context``) partitions each layer as soon as it is
  constructed; Hugging Face's init then runs on rank 0 one module at a time (:func:`~autoglm_train.model.decoder.
  new_decoder`). No rank holds more than one layer whole;
* FSDP2: rank 0 builds it whole on the host, the other ranks on the meta device; after ``fully_shard`` rank 0's
  weights are broadcast into every rank's shards. A 9B student is whole once per job, not once per rank.

Building never moves the global random state: every rank leaves ``configure_model`` with the state it entered
with, whichever ranks drew the initial weights. Together with the same draws in the same order on every path, a
sharded student starts from exactly the weights a DDP student of the same seed starts from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from autoglm_train.tasks.sharding import fully_shard_decoder

log = logging.getLogger(__name__)

StudentFactory = Callable[[], nn.Module]
"""Builds a fresh student where the surrounding context puts tensors (no ``device=``/``dtype=`` of its own)."""


def build_student(factory: StudentFactory, trainer: Any, mesh: Any | None) -> tuple[nn.Module, str]:
    """``(student, how it was built)``; ``mesh`` is FSDP2's data-parallel mesh (``None`` for other strategies)."""
    strategy = trainer.strategy
    with _random_state_kept(strategy.root_device):
        if mesh is not None:
            student, how = _fsdp_from_rank0(factory, mesh, trainer.global_rank, strategy.root_device), "rank0-broadcast"
        else:
            student = factory()
            partitioned = any(hasattr(p, "ds_id") for p in student.parameters())
            how = "zero.Init" if partitioned else "whole"
    log.info("student built %s on rank %d", _DESCRIPTIONS[how], trainer.global_rank)
    return student, how


_DESCRIPTIONS = {
    "whole": "whole on its device",
    "zero.Init": "partitioned layer by layer by deepspeed.zero.Init",
    "rank0-broadcast": "whole on rank 0 only, then sharded and broadcast (FSDP2)",
}


def _fsdp_from_rank0(factory: StudentFactory, mesh: Any, rank: int, device: torch.device) -> nn.Module:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if rank == 0:
        student = factory()
        full = student.state_dict()  # keeps rank 0's whole weights alive until they are broadcast
    else:
        with torch.device("meta"):
            student = factory()
        full = {}
    fully_shard_decoder(student, mesh)
    if rank != 0:
        student.to_empty(device=device)  # this rank's shards, allocated; their values arrive below
    set_model_state_dict(student, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in student.buffers():  # non-persistent buffers (rotary inv_freq) are in no state dict
        dist.broadcast(buffer, src=0)
    return student


@contextmanager
def _random_state_kept(device: torch.device) -> Iterator[None]:
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        yield
