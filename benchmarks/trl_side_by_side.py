"""Ours (``recipe=distill``) against TRL's distillation trainers, side by side, in one run (issue 17, item 4).

Why: a claim that our recipe is faster and leaner than TRL only holds if both train the same student from the same
weights on the same tokens with the same optimiser. Every arm here does, and each runs in its own process so its
peak RSS is its own (``os.wait4``).

Arms, at 8 x 256 and 2 x 1024 tokens per step (fp32, AdamW with one lr and no schedule, forward KL, same steps):

* ours: the real ``python train.py recipe=distill ...`` (``loss.kd_ratio=1``: pure forward KL), and ``loss.lmbda=0.5``;
* TRL ``DistillationTrainer`` (its chunked loss, ``beta=0``). It is on-policy only in TRL 1.x, so its ``_generate``
  is replaced by "the completion is the block itself": it then trains on exactly our blocks, off-policy;
* TRL ``GKDTrainer`` (``experimental.gkd``, full logits, ``beta=0``) at ``lmbda=0`` and ``lmbda=0.5``. Its coin
  flips are replaced by ours (a function of seed and step), so both on-policy runs generate on the same steps.

Same for all: the teacher (SmolLM2-135M, the recipe's cached conversion, fp32); the student built once by our code
and saved with ``save_pretrained`` (TRL loads it with ``from_pretrained(use_safetensors=True)``; TRL needs the
student's vocab equal to the teacher's, so its copy drops our 64 reserved/padding rows, which KD never scores); the
blocks: the batches our lambda=0 run trained on (our packed Shakespeare blocks, recorded by its callback, in order;
checked per step by checksum in every arm). Every final student is scored by one function (:func:`heldout_kl`, the
repo's ``teacher_agreement_and_kl``) on the same held-out blocks.

Time to quality: ours with its levers (``student.init=teacher``; a bf16 teacher only where the CPU has avx512_bf16;
with ``--ttq-levers init,bf16,topk`` also the teacher top-k cache, built inside the timed run) against the best TRL
run at 8 x 256: wall-clock from process start until our held-out KL is at or below the KL that TRL run ends at, probed
every steps/10 steps, capped at 2x that run's wall time (process start to last step) and 2x its steps.

    pip install -e '.[bench]'                                   # TRL (not installed by make setup)
    python benchmarks/trl_side_by_side.py                        # full run; writes its RESULTS.md section
    python benchmarks/trl_side_by_side.py --quick                # 3 steps per arm: checks that everything runs
    python benchmarks/trl_side_by_side.py --steps 100 --shapes 8x256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from results import TRAIN_ONLY, write_section

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("AUTOGLM_CACHE", REPO / ".cache"))
TARGETS = {"tokens/s vs faster TRL": 1.3, "RSS vs GKDTrainer": 0.5, "RSS vs DistillationTrainer": 1.0, "ttq": 1.5}


@dataclass(frozen=True)
class Arm:
    """One training run; ``kind`` is ours | dt (DistillationTrainer) | gkd."""

    kind: str
    lmbda: float
    batch: int
    seq_len: int

    @property
    def shape(self) -> str:
        return f"{self.batch}x{self.seq_len}"

    @property
    def name(self) -> str:
        base = {"ours": "ours (recipe=distill)", "dt": "TRL DistillationTrainer", "gkd": "TRL GKDTrainer"}[self.kind]
        return base if self.kind == "dt" else f"{base} λ={self.lmbda:g}"

    @property
    def slug(self) -> str:
        return f"{self.shape}-{self.kind}-{self.lmbda:g}"


@dataclass(frozen=True)
class Setup:
    """What every arm shares: paths prepared once, and the training settings."""

    work: str
    teacher_dir: str
    init_dir: str  # our student, built once (vocab incl. reserved rows)
    init_trl_dir: str  # the same weights cut to the teacher's vocab (TRL requires equal vocab sizes)
    kd_vocab: int
    steps: int
    warmup: int
    lr: float
    seed: int
    max_new_tokens: int
    eval_blocks: int

    def blocks(self, arm: Arm) -> str:
        """Held-out blocks of ``arm``'s shape: ``{"val_ids", "val_labels"}``."""
        return str(Path(self.work) / f"heldout_{arm.shape}.pt")

    def train_batches(self, arm: Arm) -> str:
        """``[steps, batch, seq_len]`` input_ids our lambda=0 run trained on, recorded by its callback."""
        return str(Path(self.work) / f"train_{arm.shape}.pt")


# --------------------------------------------------------------------------------------------------------------------
# Shared pieces: block checksums and the one held-out KL function
# --------------------------------------------------------------------------------------------------------------------


def checksum(ids) -> str:
    """Order-independent fingerprint of a batch's rows (TRL's DistillationTrainer shuffles within a batch)."""
    import torch

    weights = torch.arange(1, ids.shape[1] + 1, dtype=torch.int64)
    return ",".join(str(v) for v in sorted((ids.long() * weights).sum(1).tolist()))


def _split(model):
    return getattr(model, model.base_model_prefix), model.get_output_embeddings()


def teacher_states(teacher, val_ids, batch: int = 4) -> list:
    """The teacher's last hidden states on the held-out blocks: computed once, reused for every student."""
    import torch

    backbone, _ = _split(teacher)
    with torch.no_grad():
        return [backbone(input_ids=val_ids[i : i + batch]).last_hidden_state for i in range(0, len(val_ids), batch)]


def heldout_kl(student, teacher, states: list, val_ids, val_labels, vocab: int, batch: int = 4) -> float:
    """Mean per-token KL(teacher || student) in nats over the held-out blocks, on the first ``vocab`` columns.

    The one scorer of every arm (and of the time-to-quality probe); the KL itself is the repo's validation metric.
    """
    import torch

    from autoglm_train.distill.teacher_agreement import teacher_agreement_and_kl

    was_training = student.training
    student.eval()
    backbone, head = _split(student)
    total, count = 0.0, 0
    with torch.no_grad():
        for ht, i in zip(states, range(0, len(val_ids), batch), strict=True):
            labels = val_labels[i : i + batch]
            hs = backbone(input_ids=val_ids[i : i + batch]).last_hidden_state
            _, kl = teacher_agreement_and_kl(hs, head, ht, _split(teacher)[1], labels, vocab)
            n = int((labels != -100).sum())
            total, count = total + float(kl) * n, count + n
    student.train(was_training)
    return total / max(count, 1)


# --------------------------------------------------------------------------------------------------------------------
# Preparation (once): student init, blocks
# --------------------------------------------------------------------------------------------------------------------


def prepare(work: Path, shapes: list[tuple[int, int]], args: argparse.Namespace) -> Setup:
    """Build and save the student once, and write each shape's held-out blocks."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from transformers import AutoConfig

    from autoglm_train.data.datamodule import TextDataModule
    from autoglm_train.data.loader import fetch_batch
    from autoglm_train.distill.teacher import load_teacher_tokenizer, teacher_dir
    from autoglm_train.distill.vocab import plan_vocab, student_tokenizer
    from autoglm_train.model.decoder import build_decoder

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["recipe=distill", f"paths.cache_dir={CACHE}", f"seed={args.seed}"])
    spec = instantiate(cfg.teacher)
    teacher_tok = load_teacher_tokenizer(spec)
    base_vocab = len(teacher_tok)
    tok = student_tokenizer(teacher_tok)
    tdir = teacher_dir(spec)
    kd_vocab = plan_vocab(AutoConfig.from_pretrained(tdir).vocab_size, base_vocab, tok).kd_vocab_size

    torch.manual_seed(args.seed)
    student = build_decoder(instantiate(cfg.model), len(tok), tok.pad_token_id, tok.eos_token_id)
    init_dir, init_trl_dir = work / "init", work / "init_trl"
    student.save_pretrained(init_dir, safe_serialization=True)
    embed = student.get_input_embeddings().weight.detach().clone()
    student.resize_token_embeddings(kd_vocab, mean_resizing=False)
    assert torch.equal(student.get_input_embeddings().weight, embed[:kd_vocab])
    student.save_pretrained(init_trl_dir, safe_serialization=True)

    for batch, seq_len in shapes:
        data = TextDataModule(instantiate(cfg.data, seq_len=seq_len, batch_size=batch), tok)
        data.setup("fit")
        val = fetch_batch(data.data.val, list(range(min(args.eval_blocks, len(data.data.val)))))
        torch.save(
            {"val_ids": val["input_ids"], "val_labels": val["labels"]},
            work / f"heldout_{batch}x{seq_len}.pt",
        )
    eval_blocks = min(args.eval_blocks, len(data.data.val))
    return Setup(
        str(work),
        tdir,
        str(init_dir),
        str(init_trl_dir),
        kd_vocab,
        args.steps,
        args.warmup,
        args.lr,
        args.seed,
        64,
        eval_blocks,
    )


# --------------------------------------------------------------------------------------------------------------------
# Ours: python train.py recipe=distill, with a callback that loads the shared init, times steps and probes KL
# --------------------------------------------------------------------------------------------------------------------


def ours_hooks(out: str, init_from: str | None = None, record: str | None = None, probe: dict | None = None):
    """Hydra ``_target_`` (train.py ``callbacks=[...]``): a Lightning callback made here so TRL's processes never
    import Lightning. Loads ``init_from`` into the student before step 1, times every step, saves the batches it
    trained on to ``record`` (TRL is fed exactly those), and with ``probe`` scores held-out KL every few steps (clock
    paused) and stops at the target or the wall-time cap."""
    import lightning as L
    from safetensors.torch import load_file

    class OursHooks(L.Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.checksums: list[str] = []
            self.curve: list[dict] = []
            self.batches: list = []
            self.probe_s = 0.0
            self._eval = None

        def on_fit_start(self, trainer, pl_module) -> None:
            if init_from:
                weights = load_file(str(Path(init_from) / "model.safetensors"))
                missing, unexpected = pl_module.student.load_state_dict(weights, strict=False)
                assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied head

        def on_train_start(self, trainer, pl_module) -> None:
            if probe:
                self._probe(trainer, pl_module)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.checksums.append(checksum(batch["input_ids"]))  # before any on-policy replacement
            if record:
                self.batches.append(batch["input_ids"].clone())
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.seconds.append(time.perf_counter() - self._t0)
            if probe and trainer.global_step % int(probe["every"]) == 0:
                self._probe(trainer, pl_module)

        def _probe(self, trainer, pl_module) -> None:
            start = time.perf_counter()
            if self._eval is None:  # an fp32 reference teacher, whatever dtype training uses
                import torch
                from transformers import AutoModelForCausalLM

                teacher = AutoModelForCausalLM.from_pretrained(probe["teacher_dir"], dtype=torch.float32).eval()
                blocks = torch.load(probe["blocks"])
                self._eval = (teacher, teacher_states(teacher, blocks["val_ids"]), blocks)
            teacher, states, blocks = self._eval
            kl = heldout_kl(pl_module.student, teacher, states, blocks["val_ids"], blocks["val_labels"], probe["vocab"])
            self.probe_s += time.perf_counter() - start
            wall = time.time() - float(os.environ["SBS_T0"]) - self.probe_s
            self.curve.append({"step": trainer.global_step, "wall_s": wall, "kl": kl})
            if kl <= float(probe["target"]) or wall >= float(probe["cap_s"]):
                trainer.should_stop = True

        def on_train_end(self, trainer, pl_module) -> None:
            result = {"seconds": self.seconds, "checksums": self.checksums, "curve": self.curve}
            result["t_end"] = time.time() - self.probe_s
            Path(out).write_text(json.dumps(result))
            if record:
                import torch

                torch.save(torch.stack(self.batches), record)

    return OursHooks()


def _hydra_value(value) -> str:
    """A Python value as a Hydra override value (dict keys unquoted, strings single-quoted)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_hydra_value(v)}" for k, v in value.items()) + "}"
    return f"'{value}'" if isinstance(value, str) else repr(value)


def ours_command(
    arm: Arm, setup: Setup, out: Path, extra: list[str], hooks: dict, cache: Path = CACHE, steps: int | None = None
) -> list[str]:
    """The real recipe command line for ``arm`` (validation, checkpoints and samples off: only steps are timed)."""
    node = _hydra_value({"_target_": "trl_side_by_side.ours_hooks", **hooks})
    return [
        sys.executable,
        "train.py",
        "recipe=distill",
        f"data.seq_len={arm.seq_len}",
        f"data.batch_size={arm.batch}",
        "trainer.precision=32",
        "loss=forward_kl",
        "loss.kd_ratio=1.0",
        f"loss.lmbda={arm.lmbda}",
        f"loss.max_new_tokens={setup.max_new_tokens}",
        f"optim.optimizer.lr={setup.lr}",
        "optim.scheduler=null",
        f"trainer.max_steps={steps or setup.steps}",
        *TRAIN_ONLY,
        f"paths.root_dir={out}",
        f"paths.cache_dir={cache}",
        "run_name=sbs",
        "ckpt_path=null",
        f"seed={setup.seed}",
        *extra,
        f"callbacks=[{node}]",
    ]


# --------------------------------------------------------------------------------------------------------------------
# TRL: one child process per arm (python trl_side_by_side.py --child ...)
# --------------------------------------------------------------------------------------------------------------------


def _trl_args(arm: Arm, setup: Setup, out: Path) -> dict:
    """The TRL ``TrainingArguments`` both TRL arms share: ours' steps, batch, lr, clipping, seed; CPU, fp32, quiet."""
    return {
        "output_dir": str(out / "trl"),
        "max_steps": setup.steps,
        "per_device_train_batch_size": arm.batch,
        "gradient_accumulation_steps": 1,
        "learning_rate": setup.lr,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 1.0,
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "gradient_checkpointing": False,
        "logging_steps": 10**6,
        "save_strategy": "no",
        "report_to": "none",
        "seed": setup.seed,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }


def _gkd_collate(prompt_len: int):
    """GKD's batch of our blocks: the whole block as labels, its first ``prompt_len`` tokens as the prompt."""
    import torch

    def collate(examples: list[dict]) -> dict:
        ids = torch.tensor([e["input_ids"] for e in examples])
        ones = torch.ones_like(ids)
        return {
            "input_ids": ids,
            "attention_mask": ones,
            "labels": ids.clone(),
            "prompts": ids[:, :prompt_len],
            "prompt_attention_mask": ones[:, :prompt_len],
        }

    return collate


def trl_child(arm: Arm, setup: Setup, out: Path) -> None:
    """Train ``arm`` with TRL on the shared blocks and init; writes ``out/result.json`` and ``out/student``."""
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from autoglm_train.distill.on_policy import is_on_policy

    rows = torch.load(setup.train_batches(arm)).reshape(-1, arm.seq_len)  # step s trains rows [s*B, (s+1)*B)
    tok = AutoTokenizer.from_pretrained(setup.teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(setup.init_trl_dir, use_safetensors=True, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(setup.teacher_dir, use_safetensors=True, dtype=torch.float32)
    optimizer = torch.optim.AdamW(student.parameters(), lr=setup.lr, betas=(0.9, 0.95), weight_decay=0.01)  # = ours
    common = _trl_args(arm, setup, out)
    seen: dict = {"checksums": [], "on_policy": 0}

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._t0)

    timer = StepTimer()
    # what both TRL trainers get alike: the shared init, the teacher, the tokenizer, our AdamW and the step timer
    shared = {
        "model": student,
        "teacher_model": teacher,
        "processing_class": tok,
        "optimizers": (optimizer, None),
        "callbacks": [timer],
    }
    if arm.kind == "dt":
        from trl import DistillationConfig, DistillationTrainer

        class BlocksAsCompletions(DistillationTrainer):
            """The completion of each "prompt" is the rest of its block: TRL's chunked loss on our exact tokens."""

            def _generate(self, prompts):
                seen["checksums"].append(checksum(torch.tensor(prompts)))
                return [p[:1] for p in prompts], [p[1:] for p in prompts], None, None, None

        config = DistillationConfig(**common, beta=0.0, temperature=1.0, shuffle_dataset=False)
        trainer = BlocksAsCompletions(args=config, train_dataset=Dataset.from_dict({"prompt": rows.tolist()}), **shared)
    else:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        collate = _gkd_collate(arm.seq_len - setup.max_new_tokens + 1)  # prompt + generated = seq_len + 1

        class SameBlocksGKD(GKDTrainer):
            """Our block order, and our coin flips (seed, step) instead of ``random.random()``."""

            def _get_train_sampler(self, train_dataset=None):
                return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

            def training_step(self, model, inputs, num_items_in_batch=None):
                seen["checksums"].append(checksum(inputs["input_ids"]))
                flip = is_on_policy(arm.lmbda, setup.seed, len(seen["checksums"]) - 1)
                seen["on_policy"] += int(flip)
                self.lmbda = 1.0 if flip else 0.0
                return super().training_step(model, inputs, num_items_in_batch)

        config = GKDConfig(
            **common, lmbda=arm.lmbda, beta=0.0, temperature=1.0, max_new_tokens=setup.max_new_tokens, seq_kd=False
        )
        trainer = SameBlocksGKD(
            args=config, data_collator=collate, train_dataset=Dataset.from_dict({"input_ids": rows.tolist()}), **shared
        )
    trainer.train()
    t_end = time.time()
    trainer.model.save_pretrained(out / "student", safe_serialization=True)
    result = {"seconds": timer.seconds, "checksums": seen["checksums"], "on_policy": seen["on_policy"], "t_end": t_end}
    (out / "result.json").write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------------------------------
# Running the arms, scoring, reporting
# --------------------------------------------------------------------------------------------------------------------


def run_process(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd`` (cwd = repo); returns (this process's own peak RSS in MB, start time). Raises with the log tail."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    t0 = time.time()
    env["SBS_T0"] = repr(t0)
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage, not the max over all children
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {proc.returncode}\n{log.read_text()[-4000:]}")
    return usage.ru_maxrss / 1024, t0


def run_arm(arm: Arm, setup: Setup) -> dict:
    out = Path(setup.work) / arm.slug
    out.mkdir()
    if arm.kind == "ours":
        hooks = {"out": str(out / "result.json"), "init_from": setup.init_dir}
        if arm.lmbda == 0:  # runs first at each shape: the batches every other arm is fed
            hooks["record"] = setup.train_batches(arm)
        cmd = ours_command(arm, setup, out, [], hooks)
    else:
        cmd = [sys.executable, __file__, "--child", json.dumps({"arm": asdict(arm), "setup": asdict(setup)})]
    rss, t0 = run_process(cmd, out / "log.txt")
    result = json.loads((out / "result.json").read_text())
    student = out / "outputs" / "sbs" / "student" if arm.kind == "ours" else out / "student"
    timed = result["seconds"][setup.warmup :]
    if arm.kind == "ours":  # the task's coin flips, recomputed (GKD reports the ones it made, the same function)
        from autoglm_train.distill.on_policy import is_on_policy

        result["on_policy"] = sum(is_on_policy(arm.lmbda, setup.seed, i) for i in range(len(result["seconds"])))
    return {
        "arm": arm,
        "rss_mb": rss,
        "wall_s": result["t_end"] - t0,
        "tokens_per_s": arm.batch * arm.seq_len * len(timed) / max(sum(timed), 1e-9),
        "step_s": sum(timed) / max(len(timed), 1),
        "checksums": result["checksums"],
        "on_policy": result.get("on_policy"),
        "student": str(student),
    }


def score(rows: list[dict], setup: Setup) -> dict[str, float]:
    """Held-out KL of every final student (and of the shared init, per shape), one teacher pass per shape."""
    import torch
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(setup.teacher_dir, dtype=torch.float32).eval()
    init_kl = {}
    for shape in dict.fromkeys(r["arm"].shape for r in rows):
        arm = next(r["arm"] for r in rows if r["arm"].shape == shape)
        blocks = torch.load(setup.blocks(arm))
        states = teacher_states(teacher, blocks["val_ids"])
        for r in [{"student": setup.init_dir}, *(r for r in rows if r["arm"].shape == shape)]:
            model = AutoModelForCausalLM.from_pretrained(r["student"], dtype=torch.float32)
            r["kl"] = heldout_kl(model, teacher, states, blocks["val_ids"], blocks["val_labels"], setup.kd_vocab)
            init_kl.setdefault(shape, r["kl"])  # the first one scored is the shared init
    return init_kl


def time_to_quality(rows: list[dict], setup: Setup, levers: list[str], ttq_steps: int) -> dict | None:
    """Ours with its levers until its held-out KL reaches the best TRL run's final KL (8 x 256), capped at 2x that
    run's wall time. Only the probes' scoring time is left out of the clock."""
    trl = [r for r in rows if r["arm"].kind != "ours" and r["arm"].shape == "8x256"]
    if not trl:
        return None
    best = min(trl, key=lambda r: r["kl"])
    arm = Arm("ours", 0.0, 8, 256)
    out = Path(setup.work) / "ttq"
    out.mkdir()
    extra, used = [], []
    if "init" in levers:
        extra.append("student.init=teacher")
        used.append("student.init=teacher")
    if "bf16" in levers:
        if "avx512_bf16" in Path("/proc/cpuinfo").read_text():
            extra.append("teacher.dtype=bfloat16")
            used.append("teacher.dtype=bfloat16")
        else:
            used.append("(bf16 teacher skipped: no avx512_bf16 on this CPU)")
    if "topk" in levers:  # a fresh cache, built inside the timed run; teacher conversion and blocks reused
        extra += [
            "recipe.teacher_cache.enabled=true",
            f"data.max_train_blocks={ttq_steps * arm.batch}",
            f"teacher.cache_dir={CACHE / 'teachers'}",
            f"data.cache_dir={CACHE / 'data'}",
        ]
        used.append("recipe.teacher_cache.enabled=true")
    probe = {
        "teacher_dir": setup.teacher_dir,
        "blocks": setup.blocks(arm),
        "vocab": setup.kd_vocab,
        "target": best["kl"],
        "cap_s": 2 * best["wall_s"],
        "every": max(1, setup.steps // 10),
    }
    cache = out / "cache" if "topk" in levers else CACHE
    cmd = ours_command(arm, setup, out, extra, {"out": str(out / "result.json"), "probe": probe}, cache, ttq_steps)
    run_process(cmd, out / "log.txt")
    curve = json.loads((out / "result.json").read_text())["curve"]
    hit = next((p for p in curve if p["kl"] <= best["kl"]), None)
    return {"trl": best, "levers": used, "curve": curve, "hit": hit, "cap_s": probe["cap_s"]}


def render(rows: list[dict], init_kl: dict[str, float], ttq: dict | None, setup: Setup, checks: list[str]) -> str:
    lines = [
        f"{setup.steps} steps per arm ({setup.warmup} warm-up steps left out of tokens/s), fp32, AdamW lr "
        f"{setup.lr:g} (betas 0.9/0.95, wd 0.01, no schedule, clip 1.0), forward KL, teacher SmolLM2-135M fp32, "
        f"student `model=tiny` from one shared init. Held-out KL: mean per-token KL(teacher‖student), nats, "
        f"{setup.eval_blocks} held-out blocks per shape.",
        "",
        "| shape | arm | on-policy steps | tokens/s | step s | peak RSS MB | wall s | held-out KL |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        a = r["arm"]
        on = "–" if a.lmbda == 0 else f"{r['on_policy']}/{setup.steps}"
        lines.append(
            f"| {a.shape} | {a.name} | {on} | {r['tokens_per_s']:,.0f} | {r['step_s']:.2f} | {r['rss_mb']:,.0f} "
            f"| {r['wall_s']:.0f} | {r['kl']:.4f} |"
        )
    lines += ["", f"Held-out KL of the shared init: {', '.join(f'{s} {v:.4f}' for s, v in init_kl.items())}.", ""]
    lines += ["| shape | ratio | value | target | met |", "|---|---|---:|---|---|"]
    for shape in dict.fromkeys(r["arm"].shape for r in rows):
        by = {(r["arm"].kind, r["arm"].lmbda): r for r in rows if r["arm"].shape == shape}
        ours, dt, gkd = by.get(("ours", 0.0)), by.get(("dt", 0.0)), by.get(("gkd", 0.0))
        if ours and (dt or gkd):
            faster = max((x for x in (dt, gkd) if x), key=lambda x: x["tokens_per_s"])
            lines.append(
                _ratio(
                    shape,
                    f"ours / {faster['arm'].name} tokens/s",
                    ours["tokens_per_s"] / faster["tokens_per_s"],
                    ">=",
                    1.3,
                )
            )
        if ours and gkd:
            lines.append(_ratio(shape, "ours / GKDTrainer peak RSS", ours["rss_mb"] / gkd["rss_mb"], "<=", 0.5))
        if ours and dt:
            lines.append(_ratio(shape, "ours / DistillationTrainer peak RSS", ours["rss_mb"] / dt["rss_mb"], "<=", 1.0))
        on, gkd_on = by.get(("ours", 0.5)), by.get(("gkd", 0.5))
        if on and gkd_on:
            lines.append(_ratio(shape, "ours λ=0.5 / GKD λ=0.5 tokens/s", on["tokens_per_s"] / gkd_on["tokens_per_s"]))
            lines.append(_ratio(shape, "ours λ=0.5 / GKD λ=0.5 peak RSS", on["rss_mb"] / gkd_on["rss_mb"]))
    if ttq:
        trl = ttq["trl"]
        lines += [
            "",
            f"Time to quality (8x256): target = {trl['arm'].name}'s final held-out KL {trl['kl']:.4f} after "
            f"{trl['wall_s']:.0f} s (process start to last step). Ours with {', '.join(ttq['levers'])}:",
        ]
        if ttq["hit"]:
            hit = ttq["hit"]
            lines.append(f"reached KL {hit['kl']:.4f} at step {hit['step']}, {hit['wall_s']:.0f} s.")
            lines += ["", "| ratio | value | target | met |", "|---|---:|---|---|"]
            lines.append(
                _ratio(None, "TRL wall / ours wall to the same KL", trl["wall_s"] / max(hit["wall_s"], 1e-9), ">=", 1.5)
            )
        else:
            last = ttq["curve"][-1] if ttq["curve"] else {"kl": float("nan"), "wall_s": 0.0, "step": 0}
            lines.append(
                f"not reached within the {ttq['cap_s']:.0f} s cap (KL {last['kl']:.4f} at step {last['step']}, "
                f"{last['wall_s']:.0f} s): target ≥ 1.5x not met."
            )
        lines.append(
            "Probe curve (step, s, KL): "
            + "; ".join(f"{p['step']}, {p['wall_s']:.0f}, {p['kl']:.3f}" for p in ttq["curve"])
        )
    lines += ["", *checks]
    return "\n".join(lines)


def _ratio(shape: str | None, name: str, value: float, op: str | None = None, target: float | None = None) -> str:
    met = "–" if op is None else ("met" if (value >= target if op == ">=" else value <= target) else "not met")
    goal = "–" if op is None else f"{op} {target:g}"
    return f"| {shape + ' | ' if shape else ''}{name} | {value:.2f} | {goal} | {met} |"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per arm")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of tokens/s")
    p.add_argument("--shapes", default="8x256,2x1024", help="batch x seq_len, comma separated")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW lr of every arm (the recipe's default)")
    p.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks per shape")
    p.add_argument(
        "--ttq-levers",
        default="init,bf16",
        help="ours' levers for time to quality, of init,bf16,topk ('' = skip). topk is opt-in: its cache is built"
        " inside the timed run, one teacher forward per block, so within one pass it costs what it saves",
    )
    p.add_argument("--quick", action="store_true", help="3 steps per arm, 2 held-out blocks; prints, writes nothing")
    p.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    p.add_argument("--work-dir", help="keep runs here (default: a temporary directory)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        spec = json.loads(args.child)
        arm, setup = Arm(**spec["arm"]), Setup(**spec["setup"])
        trl_child(arm, setup, Path(setup.work) / arm.slug)
        return 0
    if args.quick:
        args.steps, args.warmup, args.eval_blocks = 3, 1, 2
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]

    with tempfile.TemporaryDirectory(prefix="trl-sbs-") as tmp:
        work = Path(args.work_dir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        print(f"== preparing student init and blocks in {work}", flush=True)
        setup = prepare(work, shapes, args)
        rows = []
        for batch, seq_len in shapes:
            for kind, lmbda in (("ours", 0.0), ("dt", 0.0), ("gkd", 0.0), ("ours", 0.5), ("gkd", 0.5)):
                arm = Arm(kind, lmbda, batch, seq_len)
                print(f"== {arm.shape} {arm.name}", flush=True)
                rows.append(run_arm(arm, setup))
                r = rows[-1]
                print(f"   {r['tokens_per_s']:,.0f} tokens/s, {r['rss_mb']:,.0f} MB, {r['wall_s']:.0f} s", flush=True)
        print("== scoring held-out KL", flush=True)
        init_kl = score(rows, setup)
        checks = [_same_blocks(rows, setup)]
        levers = [x for x in args.ttq_levers.split(",") if x]
        ttq = None
        if levers:
            print("== time to quality", flush=True)
            ttq = time_to_quality(rows, setup, levers, ttq_steps=2 * args.steps)
        text = render(rows, init_kl, ttq, setup, checks)
    print(text)
    if not (args.quick or args.no_write):
        write_section("TRL side by side", text, script="trl_side_by_side.py " + " ".join(sys.argv[1:]))
    return 0


def _same_blocks(rows: list[dict], setup: Setup) -> str:
    """Each arm's per-step batch fingerprints against the recorded batches: the proof that all saw the same tokens."""
    import torch

    bad = []
    for r in rows:
        want = [checksum(b) for b in torch.load(setup.train_batches(r["arm"]))]
        if r["checksums"] != want:
            bad.append(f"{r['arm'].shape} {r['arm'].name}")
    return "Same blocks, same order, every arm: " + ("yes (checked per step)." if not bad else f"NO: {', '.join(bad)}")


if __name__ == "__main__":
    sys.exit(main())
