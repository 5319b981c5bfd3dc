"""recipe=distill's data=assistant step: the teacher answers the prompts, its answers become the KD rows.

Kept beside the recipe (not in it) so that ``recipes/distill.py`` still reads top to bottom in one screenful.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from autoglm_train.data.assistant_datamodule import AssistantDataModule
from autoglm_train.tasks.trainer_factory import fault_tolerance


def attach_teacher_answers(
    cfg: DictConfig, data: Any, teacher, teacher_spec, tokenizer, kd_vocab: int, trainer: L.Trainer
) -> dict[str, Any] | None:
    """Have the teacher answer every prompt-only row of ``data`` (cached under ``<cache_dir>/teacher_answers``,
    keyed by the teacher's weights, the sampling settings and the prompt) and attach the answers; returns the
    build's stats for the run summary (seconds, generated, reused, ...), or None when ``data`` is not
    ``data=assistant``."""
    if not isinstance(data, AssistantDataModule):
        return None
    from autoglm_train.distill.teacher_answers import AnswerSpec, teacher_answers, teacher_fingerprint
    from autoglm_train.model.thinking import template_thinks

    spec = AnswerSpec(**cfg.recipe.teacher_answers)
    own = tokenizer.chat_template  # the teacher's own template (the student shares the teacher's tokenizer)
    prompts = data.teacher_prompts(own, teacher_thinks=template_thinks(tokenizer))
    if not teacher_spec.load_in_8bit:  # bitsandbytes int8 weights are placed at load time
        teacher.to(trainer.strategy.root_device)
    answers, stats = teacher_answers(
        teacher,
        tokenizer,
        prompts,
        spec,
        Path(cfg.paths.cache_dir) / "teacher_answers",
        teacher_fingerprint(teacher_spec),
        kd_vocab,
        # global rank 0 writes the answers; the other ranks (torchrun, srun) wait for them instead of asking again
        wait_s=None if trainer.global_rank == 0 else float(fault_tolerance(cfg)["rendezvous_timeout_s"]),
    )
    data.attach_teacher_answers(answers)
    return stats
