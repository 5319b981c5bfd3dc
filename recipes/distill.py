"""recipe=distill: a frozen teacher LM teaches the student GLM decoder.

Reads top to bottom: tokenizer + vocab preflight → data → teacher → student (+ QAT fake-quant) →
task → fit (resumable) → save the student as a plain HF directory (+ its int8 form) → summary.
``teacher=server``: the teacher runs on another machine behind an OpenAI-compatible endpoint; it is checked in
step 1 (tokenizer, vocabulary, top-k allowance) and only fills the offline top-k cache in step 3b.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from autoglm_train.data.assistant import AssistantDataSpec
from autoglm_train.data.assistant_datamodule import AssistantDataModule
from autoglm_train.data.chat import ChatDataSpec
from autoglm_train.data.chat_datamodule import ChatDataModule
from autoglm_train.data.datamodule import TextDataModule
from autoglm_train.distill.teacher import load_teacher, load_teacher_tokenizer
from autoglm_train.distill.teacher_client import ServerTeacherSpec, TeacherServer
from autoglm_train.distill.teacher_init import StudentInitSpec, load_mapped, teacher_initialised
from autoglm_train.distill.topk_cache import (
    TopKCacheSpec,
    cache_dir_for,
    model_scorer,
    wait_for_topk_cache,
    write_topk_cache,
)
from autoglm_train.distill.vocab import plan_vocab, student_tokenizer
from autoglm_train.errors import ConfigValueError
from autoglm_train.model.decoder import DecoderSpec, build_decoder, count_parameters
from autoglm_train.model.hf_io import save_hf_decoder
from autoglm_train.model.prompt_format import end_of_turn_id
from autoglm_train.quant.callback import QATStartCallback
from autoglm_train.quant.qat import convert_qat
from autoglm_train.tasks.distill_task import DistillTask
from autoglm_train.tasks.sharding import gathered_student
from autoglm_train.tasks.summary import write_summary
from autoglm_train.tasks.trainer_factory import build_trainer, checkpoint_dir, checkpoint_format, fault_tolerance
from autoglm_train.utils.resume import resolve_ckpt_path
from recipes.assistant_steps import attach_teacher_answers

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Distill ``cfg.teacher`` into a ``cfg.model`` student (fresh or from the teacher: ``cfg.student``); returns
    the run summary."""
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    quant = cfg.get("quant") or {}
    qat = instantiate(quant.qat) if quant.get("qat") else None  # int8 switches checked before anything heavy
    ptq = instantiate(quant.ptq) if quant.get("ptq") else None
    trainer = build_trainer(cfg, [QATStartCallback(qat.start_step)] if qat else None)  # checks precision/hardware

    # 1. Tokenizer and vocabulary preflight (cheap; fails before the teacher is loaded).
    #    A teacher server is asked here too: another tokenizer or vocabulary, or a top_k it cannot give, stops
    #    the run with one line before any data is packed.
    teacher_spec = instantiate(cfg.teacher)
    server = _connect(cfg, teacher_spec) if isinstance(teacher_spec, ServerTeacherSpec) else None
    _check_teacher_shard(teacher_spec, trainer)
    _check_on_policy(cfg)
    tokenizer, base_vocab = _tokenizer(cfg, teacher_spec, server)
    remote = server.preflight(tokenizer, base_vocab) if server else None

    # 2. Data: text tokenized, packed, split and cached; or conversations (data=chat), assistant tokens as targets;
    #    or data=assistant: prompts the teacher answers (step 3c) + solver-written reasoning rows (+ text batches).
    data_spec = instantiate(cfg.data)
    chat = isinstance(data_spec, ChatDataSpec)
    assistant = isinstance(data_spec, AssistantDataSpec)
    if (chat or assistant) and (remote or cfg.recipe.teacher_cache.enabled):  # refused before the teacher is loaded
        raise ConfigValueError(
            "recipe.teacher_cache (and teacher=server, which builds it) is for packed text; data=chat and "
            "data=assistant rows are scored by an in-process teacher"
        )
    if chat:
        data = ChatDataModule(data_spec, tokenizer)
    else:
        data = AssistantDataModule(data_spec, tokenizer) if assistant else TextDataModule(data_spec, tokenizer)

    # 3. Teacher (frozen) and the width both sides are compared on; a teacher server stays where it is.
    teacher = None if remote else load_teacher(teacher_spec, trainer.strategy.root_device)  # onto the rank's GPU
    rows = remote.vocab_size if remote else teacher.get_output_embeddings().weight.shape[0]
    plan = plan_vocab(rows, base_vocab, tokenizer)

    # 3b. Offline teacher top-k (always, for a teacher server): training then never runs the teacher.
    cache_spec = TopKCacheSpec(**cfg.recipe.teacher_cache)
    if remote:
        cache_spec = TopKCacheSpec(**{**cfg.recipe.teacher_cache, "enabled": True, "k": teacher_spec.top_k})
        _attach_topk_cache(cfg, cache_spec, data, plan.kd_vocab_size, remote.teacher_id, server.score, trainer)
        server.close()
    elif cache_spec.enabled:
        if not teacher_spec.load_in_8bit:
            teacher.to(trainer.strategy.root_device)
        score = model_scorer(teacher, cache_spec, plan.kd_vocab_size)
        teacher_id = cfg.teacher.path + ("#int8" if teacher_spec.load_in_8bit else "")  # int8 teacher: its own top-k
        _attach_topk_cache(cfg, cache_spec, data, plan.kd_vocab_size, teacher_id, score, trainer)

    # 3c. data=assistant: the teacher answers every prompt-only row (rendered with the bundle's template), cached
    #     on disk by teacher, settings and prompt; its answers and their top-k become the KD rows.
    answer_stats = attach_teacher_answers(cfg, data, teacher, teacher_spec, tokenizer, plan.kd_vocab_size, trainer)

    # 4. Student: a fresh GLM decoder with the teacher's token ids, built by the task inside the strategy's context
    #    (ZeRO-3 partitions it layer by layer as it is constructed; FSDP2 builds it whole on rank 0 only).
    #    QAT: it trains under int8 fake-quant (same Parameters and state_dict keys, so resume works).
    #    student.init=teacher: the teacher's weights mapped into GLM, cut to the student's shape by measured importance.
    make_student, init_summary = _student(cfg, trainer, teacher, tokenizer, data, plan.kd_vocab_size, qat)

    # 5. Task and fit; resumes from the newest complete checkpoint when asked.
    task = DistillTask(
        make_student,
        teacher,
        instantiate(cfg.loss),
        instantiate(cfg.optim.optimizer),
        instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None,
        plan.kd_vocab_size,
        shard_teacher=teacher is not None and teacher_spec.shard,
        seed=cfg.seed,
        stop_token_id=end_of_turn_id(tokenizer),
    )
    ckpt = resolve_ckpt_path(cfg.ckpt_path, checkpoint_dir(cfg), formats={checkpoint_format(trainer)})
    trainer.fit(task, datamodule=data, ckpt_path=ckpt)
    val = trainer.validate(task, datamodule=data, verbose=False)[0] if trainer.limit_val_batches else {}
    if qat:
        convert_qat(task.student)  # back to plain float modules: the weights that learned to survive int8

    # 6. The student as a plain HF directory, plus greedy samples to eyeball: written by global rank 0
    #    (ZeRO-3 / FSDP gather the shards first; every rank takes part in that).
    final = gathered_student(trainer, task.student)
    if final is None:
        return {"recipe": "distill", "global_rank": trainer.global_rank}
    student_dir = save_hf_decoder(final, tokenizer, out_dir / "student")
    template = getattr(data, "template", None)  # conversations: samples asked as the server asks them
    samples = _samples(
        final, tokenizer, list(cfg.recipe.sample_prompts), int(cfg.recipe.sample_max_new_tokens), template
    )

    # 7. The int8 serving form (PTQ of the saved student) in student_int8/, loaded back and scored against the
    #    float student on held-out batches; the export ships that same file while the student is unchanged.
    int8 = _int8_form(final.cpu(), student_dir, ptq, data, plan.kd_vocab_size, out_dir) if ptq else {}
    summary = {
        "recipe": "distill",
        "student_dir": str(student_dir),
        "student_params": count_parameters(final),
        "student_init": init_summary,
        "teacher": remote.teacher_id if remote else cfg.teacher.path,
        "global_step": trainer.global_step,
        "resumed_from": ckpt,
        "data": {**data.stats, "skipped_rows": data.report.to_dict()},
        **({"teacher_answers": answer_stats} if answer_stats is not None else {}),
        **{k: float(v) for k, v in val.items()},
        "quant": OmegaConf.to_container(quant, resolve=True) if quant else None,
        **int8,
        "samples": samples,
    }
    write_summary(out_dir / "run_summary.json", summary)
    ppl, agree = (summary.get(k, float("nan")) for k in ("val/ppl", "val/teacher_top1_agreement"))
    log.info("student saved to %s | val/ppl %.2f | agreement %.3f", student_dir, ppl, agree)
    return summary


def _teacher_init(
    cfg: DictConfig, trainer: L.Trainer, teacher, model: DecoderSpec, init: StudentInitSpec, data, vocab_rows: int
) -> tuple[DecoderSpec, dict[str, torch.Tensor], dict]:
    """(student shape, mapped weights, what was kept) for ``student.init=teacher``, measured on the first train
    blocks."""
    if getattr(trainer.strategy, "zero_stage_3", False) or cfg.teacher.get("shard", False):
        raise ConfigValueError(
            "student.init=teacher is not supported under trainer=deepspeed_zero3 / teacher.shard=true yet "
            "(the mapped weights would have to be scattered into ZeRO-3 partitions); use ddp, fsdp or one device"
        )
    from autoglm_train.data.datamodule import calibration_batches

    data.setup("fit")
    batches = calibration_batches(data.data.train, init.calibration_blocks, init.calibration_batch_size)
    spec, mapped, sel = teacher_initialised(teacher, model, init, batches, vocab_rows)
    return spec, mapped, {"init": "teacher", "layer_score": init.layer_score, "layers": sel.layers, **sel.scores}


def _connect(cfg: DictConfig, spec: ServerTeacherSpec) -> TeacherServer:
    """The teacher server's client, after the settings a teacher outside this process cannot serve are refused."""
    lmbda = float(cfg.loss.get("lmbda", 0.0))
    if lmbda > 0:
        raise ConfigValueError(
            f"loss.lmbda={lmbda} with teacher=server: on-policy batches need the teacher in this process to score "
            "the student's samples; the server only fills the top-k cache"
        )
    if cfg.get("student") and cfg.student.get("init") == "teacher":
        raise ConfigValueError("student.init=teacher needs the teacher's weights in this process, not teacher=server")
    server = TeacherServer(spec)
    server.served_model()
    return server


def _check_teacher_shard(teacher_spec, trainer: L.Trainer) -> None:
    if getattr(teacher_spec, "shard", False) and not getattr(trainer.strategy, "zero_stage_3", False):
        raise ConfigValueError(
            "teacher.shard=true partitions the teacher with DeepSpeed ZeRO-3: it needs trainer=deepspeed_zero3 "
            f"(this run: {_strategy_name(trainer)})"
        )


def _attach_topk_cache(
    cfg: DictConfig, spec: TopKCacheSpec, data, kd_vocab: int, teacher_id: str, score, trainer: L.Trainer
) -> None:
    """Score the train split with the teacher once (or reuse the cache of this teacher) and attach its top-k.

    Global rank 0 writes the cache; the other ranks (torchrun, srun) wait for it instead of asking the teacher again.
    """
    data.setup("fit")
    cache_dir = cache_dir_for(
        Path(cfg.paths.cache_dir) / "teacher_topk",
        teacher_id,
        f"{data.data.cache_path.name}:{len(data.data.train)}",
        spec.k,
        kd_vocab,
    )
    if trainer.global_rank == 0:
        cache = write_topk_cache(score, data.data.train, cache_dir, spec, kd_vocab, teacher_id)
    else:
        cache = wait_for_topk_cache(cache_dir, fault_tolerance(cfg)["rendezvous_timeout_s"])
    data.attach_train_columns(cache)


def _student(cfg: DictConfig, trainer: L.Trainer, teacher, tokenizer, data, kd_vocab: int, qat):
    """(what the task calls to build the student, how it was initialised): the configured shape, or the teacher's
    weights cut to it (``student.init=teacher``)."""
    spec = instantiate(cfg.model)
    token_ids = (len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    init = instantiate(cfg.student) if cfg.get("student") else StudentInitSpec()
    mapped, init_summary = None, {"init": init.init}
    if init.init == "teacher":
        spec, mapped, init_summary = _teacher_init(cfg, trainer, teacher, spec, init, data, kd_vocab)
    shape = build_decoder(spec, *token_ids, device="meta")
    params = f"{count_parameters(shape):,}"
    log.info("student %s: %s params (vocab %d, KD over %d)", spec.name, params, shape.config.vocab_size, kd_vocab)
    return _student_factory(spec, token_ids, mapped, qat), init_summary


def _student_factory(spec: DecoderSpec, token_ids: tuple, mapped: dict | None, qat):
    """What the task calls to build the student inside the strategy's context."""

    def make_student() -> torch.nn.Module:
        student = build_decoder(spec, *token_ids, device=None, dtype=None)
        if mapped is not None and not next(student.parameters()).is_meta:  # FSDP2's other ranks: rank 0 broadcasts
            load_mapped(student, mapped)
        if qat:
            from autoglm_train.quant.qat import prepare_qat

            prepare_qat(student, qat)
        return student

    return make_student


def _check_on_policy(cfg: DictConfig) -> None:
    """On-policy batches (``loss.lmbda`` > 0) need a live teacher, a KD term and room for a prompt in each block."""
    lmbda = float(cfg.loss.get("lmbda", 0.0))
    if lmbda <= 0:
        return
    if cfg.recipe.teacher_cache.enabled:
        raise ConfigValueError(
            f"loss.lmbda={lmbda} with recipe.teacher_cache.enabled=true: the cached top-k scores the training text, "
            "not the student's samples; turn one off"
        )
    if float(cfg.loss.kd_ratio) <= 0:
        raise ConfigValueError(f"loss.lmbda={lmbda} with loss.kd_ratio=0: on-policy batches train the KD term only")
    if int(cfg.loss.max_new_tokens) > int(cfg.data.seq_len):
        raise ConfigValueError(
            f"loss.max_new_tokens={cfg.loss.max_new_tokens} > data.seq_len={cfg.data.seq_len}: no room for a prompt"
        )


def _strategy_name(trainer: L.Trainer) -> str:
    """``DDPStrategy``, ``DeepSpeedStrategy (ZeRO stage 2)``, ...: for error messages."""
    name = type(trainer.strategy).__name__
    config = getattr(trainer.strategy, "config", None)
    if isinstance(config, dict) and "zero_optimization" in config:
        name += f" (ZeRO stage {config['zero_optimization'].get('stage')})"
    return name


def _tokenizer(cfg: DictConfig, teacher_spec, server: TeacherServer | None = None):
    """(the student's tokenizer: the teacher's or ``recipe.student_tokenizer``, + reserved tokens; the teacher's
    vocabulary size). A teacher server's tokenizer is ``teacher.tokenizer``, else its served model's name."""
    from transformers import AutoTokenizer

    if server is not None:
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_spec.tokenizer or server.model)
    else:
        teacher_tokenizer = load_teacher_tokenizer(teacher_spec)
    base_vocab = len(teacher_tokenizer)  # before student_tokenizer, which may add the reserved tokens to it
    own = cfg.recipe.student_tokenizer
    return student_tokenizer(teacher_tokenizer, AutoTokenizer.from_pretrained(own) if own else None), base_vocab


def _int8_form(final, student_dir: Path, ptq, data, kd_vocab: int, out_dir: Path) -> dict:
    """``ptq/*``: the saved student quantized into ``student_int8/`` by the export's writer, loaded back, scored."""
    from autoglm_train.quant.int8_form import int8_form
    from autoglm_train.quant.int8_layout import PTQ_DIR

    return int8_form(final, student_dir, ptq, data.val_dataloader(), kd_vocab, out_dir / PTQ_DIR)


@torch.no_grad()
def _samples(model, tokenizer, prompts: list[str], max_new_tokens: int, template: str | None) -> dict[str, str]:
    """Greedy continuations of ``prompts``; with a chat ``template``, answers to them as user turns (thinking off)."""
    from autoglm_train.model.prompt_format import render_chat

    model.eval()
    out = {}
    for prompt in prompts:
        chat = [{"role": "user", "content": prompt}]
        text = render_chat(tokenizer, template, chat, {"enable_thinking": False}) if template else prompt
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=template is None).input_ids.to(model.device)
        new = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out[prompt] = tokenizer.decode(new[0, ids.shape[1] :], skip_special_tokens=True)
        log.info("sample %r -> %r", prompt, out[prompt])
    return out
