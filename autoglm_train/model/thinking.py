"""Thinking mode, the one owner of its format: the tags, the "does this template think" probe, the splitter.

The chat template decides whether the model thinks (``enable_thinking``); the model writes
``<think>reasoning</think>answer``. Everything that needs to know this reads it here: the bundle's
chat template (:mod:`.chat_template`) and the export's manifest write the tags, the export and the
engine probe a template with :func:`template_thinks`, and the server splits the output with
:class:`ThinkSplitter` (the answer as ``content``; the reasoning as ``reasoning_content`` when the
client asks with ``return_reasoning``, otherwise dropped). Streamed and non-streamed output are
split by the same state machine, so they always agree.

It sits in ``model`` (not in the engine) because the prompt format of training data
(:mod:`.prompt_format`) renders with the thinking template too.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_PROBE = [{"role": "user", "content": "2+2?"}]


def template_thinks(tokenizer, template: str | None = None) -> bool:
    """True when ``template`` (default: the tokenizer's own) has a thinking switch.

    That is: ``enable_thinking=False`` renders a closed think block and ``True`` does not. A tokenizer
    without a template, or a template that fails to render, does not think.
    """

    def render(enable_thinking: bool) -> str:
        return tokenizer.apply_chat_template(
            _PROBE, chat_template=template, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
        )

    try:
        off, on = render(False), render(True)
    except Exception:
        return False
    return THINK_CLOSE in off and THINK_CLOSE not in on


def thinking_answer(reasoning: str, answer: str) -> str:
    """An assistant turn that thought, as the model writes it after the open generation prompt (Qwen3's layout):
    ``<think>\\nreasoning\\n</think>\\n\\nanswer``; :func:`split_reasoning` gives back ``(reasoning, answer)``."""
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{answer}"


def prompt_opens_thinking(prompt_text: str) -> bool:
    """True when the rendered prompt itself ends inside an open think block (GLM-4.5/Qwen3 style templates)."""
    tail = prompt_text.rstrip()
    return tail.endswith(THINK_OPEN)


class ThinkSplitter:
    """Feed generated text in pieces; get back ``(reasoning, content)`` pieces.

    Reasoning is recognised only at the start of the output (after whitespace), as models and
    templates produce it; a ``<think>`` later in the answer is ordinary text. Whitespace right
    after ``<think>``/``</think>`` and right before ``</think>`` is trimmed.

    Args:
        in_reasoning: the prompt already opened the think block.
    """

    def __init__(self, in_reasoning: bool = False) -> None:
        self.state = "reasoning_start" if in_reasoning else "start"
        self.buf = ""

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        reasoning, content = [], []
        while self._step(reasoning, content):
            pass
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """End of output: release what is held (an unclosed think block counts as reasoning)."""
        rest, self.buf = self.buf, ""
        if self.state in ("reasoning_start", "reasoning"):
            return rest.rstrip(), ""
        if self.state == "content_start":
            return "", rest.lstrip()
        return "", rest

    def _step(self, reasoning: list[str], content: list[str]) -> bool:
        """Advance the state machine once; False when more text is needed."""
        if self.state == "start":
            head = self.buf.lstrip()
            if head.startswith(THINK_OPEN):
                self.buf, self.state = head[len(THINK_OPEN) :], "reasoning_start"
                return True
            if THINK_OPEN.startswith(head):  # empty or a partial tag: wait
                return False
            self.state = "content"
            return True
        if self.state in ("reasoning_start", "content_start"):
            self.buf = self.buf.lstrip()
            if not self.buf:
                return False
            self.state = "reasoning" if self.state == "reasoning_start" else "content"
            return True
        if self.state == "reasoning":
            end = self.buf.find(THINK_CLOSE)
            if end >= 0:
                reasoning.append(self.buf[:end].rstrip())
                self.buf, self.state = self.buf[end + len(THINK_CLOSE) :], "content_start"
                return True
            # hold back a possible partial close tag and trailing whitespace (trimmed if the tag follows)
            partial = _partial_tag(self.buf, THINK_CLOSE)
            before = self.buf[: len(self.buf) - partial]
            cut = len(before.rstrip())
            reasoning.append(self.buf[:cut])
            self.buf = self.buf[cut:]
            return False
        content.append(self.buf)
        self.buf = ""
        return False


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str, str]:
    """Whole output → ``(reasoning, content)``; identical to streaming it through :class:`ThinkSplitter`."""
    splitter = ThinkSplitter(in_reasoning)
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.flush()
    return r1 + r2, c1 + c2


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0
