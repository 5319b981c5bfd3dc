"""How big each pipeline stage runs: ``quick`` (the smoke run, ~2 min) and ``default`` (the documented demo, ~25 min).

A profile is only Hydra overrides for ``train.py`` and arguments for the other CLIs, so every
number here is one a user could type; nothing changes what the stages do, only how long.
"""

from __future__ import annotations

from dataclasses import dataclass

# Lightning's progress bar writes carriage returns that make stage logs unreadable.
_NO_BAR = "trainer.enable_progress_bar=false"

# A plugin run of a few steps on a few items: enough to exercise every code path, not to learn.
_TINY_PLUGIN = (
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "data_mm.batch_size=4",
    "data_mm.eval_batch_size=8",
    "data_mm.max_val_items=4",
    "data_mm.max_test_items=8",
    "plugin.encoder_layers=1",
    _NO_BAR,
)


@dataclass(frozen=True)
class Profile:
    """Sizes of one pipeline run."""

    name: str
    distill: tuple[str, ...]
    """Hydra overrides for ``train.py recipe=distill`` (the int8 switch is added by the pipeline)."""
    vision: tuple[str, ...]
    """Hydra overrides for ``train.py recipe=add_modality plugin=vision``."""
    speech: tuple[str, ...]
    """Hydra overrides for ``train.py recipe=add_modality plugin=speech``."""
    export: tuple[str, ...]
    """Extra arguments of ``tools/export/export.py``."""
    compare_blocks: int
    """Held-out text blocks on which teacher, student and int8 student are scored."""
    speed_tokens: int
    """Greedy tokens per decode-speed measurement."""
    speed_repeats: int
    """Speed measurements per model (the best counts)."""
    eval_texts: int
    """Held-out texts scored through the server (perplexity, teacher agreement)."""
    eval_items: int
    """Held-out images and audio clips sent to the server, each."""
    eval_max_tokens: int
    """Tokens per transcription through the server."""
    eval_chat: int
    """Held-out chat prompts the teacher answers and the server is judged on (KL on the answers, plain English)."""
    eval_verifiable: int
    """Held-out verifiable questions asked through the server, thinking on and off."""
    eval_answer_tokens: int
    """Longest teacher answer (sampled at temperature 1) to a held-out chat prompt."""
    eval_chat_tokens: int
    """Tokens per greedy student answer to a chat prompt (the plain-English check)."""
    eval_think_tokens: int
    """Tokens per thinking-on answer to a verifiable question: room for the worked steps and the answer."""
    eval_direct_tokens: int
    """Tokens per thinking-off answer to a verifiable question."""
    minutes: str
    """Wall time measured on 2 idle CPU cores (printed at the start; other jobs on the cores stretch it)."""

    def __post_init__(self) -> None:
        for field in (
            *("compare_blocks", "speed_tokens", "speed_repeats", "eval_texts", "eval_items", "eval_max_tokens"),
            *("eval_chat", "eval_verifiable", "eval_answer_tokens", "eval_chat_tokens"),
            *("eval_think_tokens", "eval_direct_tokens"),
        ):
            if getattr(self, field) < 1:
                raise ValueError(f"profile {self.name}: {field} must be >= 1")


QUICK = Profile(
    name="quick",
    # the default's assistant recipe on a handful of prompts and questions, a 2-layer student
    distill=(
        *("experiment=assistant_cpu", "debug=fast", "model.num_hidden_layers=2"),
        *("data.chat_train=8", "data.verifiable_train=24", "recipe.teacher_answers.max_new_tokens=8"),
        *("quant.ptq.eval_batches=2", "recipe.sample_max_new_tokens=4", _NO_BAR),
    ),
    vision=("data_mm=digits", *_TINY_PLUGIN),
    speech=("experiment=speech_digits_cpu", "data_mm.source.num_utterances=48", *_TINY_PLUGIN),
    export=("--gguf", "none", "--no-onnx"),
    compare_blocks=4,
    speed_tokens=4,
    speed_repeats=1,
    eval_texts=4,
    eval_items=4,
    eval_max_tokens=4,
    eval_chat=4,
    eval_verifiable=6,
    eval_answer_tokens=8,
    eval_chat_tokens=8,
    eval_think_tokens=16,
    eval_direct_tokens=8,
    minutes="1",
)

DEFAULT = Profile(
    name="default",
    # make demo's recipe (conf/experiment/assistant_cpu.yaml): the teacher-initialised 8-layer student distilled on the
    # teacher's answers to the built-in chat prompts and on solver-written worked steps (hybrid thinking)
    distill=("experiment=assistant_cpu", _NO_BAR),
    # the CPU vision experiment (conv stem) on a 400-step schedule (its full 3,000 steps reach 95% in 16 min)
    vision=("experiment=vision_digits_cpu", "trainer.max_steps=400", "trainer.val_check_interval=200", _NO_BAR),
    # the experiment's own 600 steps: at 400, one of four runs stayed on the loss plateau it starts on
    speech=("experiment=speech_digits_cpu", _NO_BAR),
    export=(),
    compare_blocks=16,
    speed_tokens=32,
    speed_repeats=2,
    eval_texts=32,
    eval_items=1000,  # every held-out image and clip: the served score is on the training-time items
    eval_max_tokens=8,
    eval_chat=150,  # the held-out sets: >= 150 chat prompts, >= 300 verifiable questions
    eval_verifiable=300,
    eval_answer_tokens=48,
    eval_chat_tokens=48,
    eval_think_tokens=120,
    eval_direct_tokens=16,
    minutes="25",
)

PROFILES = {p.name: p for p in (QUICK, DEFAULT)}


def get_profile(name: str) -> Profile:
    """The named profile, or an error listing the available ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; available: {', '.join(PROFILES)}") from None
