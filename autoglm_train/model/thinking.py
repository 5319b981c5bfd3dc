"""Thinking mode: separate the reasoning between ``<think>`` tags from the answer, also mid-stream.

The chat template decides whether the model thinks (``enable_thinking``); the model writes
``<think>reasoning</think>answer``. The server returns the answer as ``content`` and, when the
client asks (``return_reasoning``), the reasoning as ``reasoning_content``; otherwise it is dropped.
Streamed and non-streamed output are split by the same state machine, so they always agree.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


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
