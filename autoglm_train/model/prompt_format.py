"""The prompt format of a plugin example: the one owner of how (question, media, answer) become tokens.

Training, held-out evaluation and the server all build a plugin prompt here, so what a plugin
learned is what a client gets:

* the user turn is the request's content parts joined in order (text as it is, each media item as
  ``num_tokens`` copies of its plugin's placeholder), exactly as ``serve.multimodal`` flattens an
  OpenAI ``content`` list;
* the conversation is rendered by the decoder's serving chat template (the template the export
  ships, :func:`~autoglm_train.model.chat_template.bundle_chat_template`) with the generation prompt, thinking off
  unless the data carries reasoning;
* the answer follows the rendered prompt and ends with the template's end-of-turn token;
* ``media_at`` says where the media placeholders sit: ``turn`` keeps them where the client put them
  in the user turn; ``answer`` moves them (in their order) to the end of the rendered prompt, right
  before the answer, so the first answer token is predicted at a position the plugin writes. A small
  frozen decoder is steered only there (measured on the 100-step CPU student: with the media in the
  turn, ten template tokens away from the answer, the vision plugin stayed at chance after 600 steps);
  the client's request is the same either way, and the server applies the recorded choice.

A plugin records its :class:`PromptFormat` in ``plugin.json``; the server renders requests that
carry that plugin's media with the recorded template and thinking switch.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from typing import Any

from autoglm_train.model.chat_template import bundle_chat_template

ORDERS = ("text_first", "media_first")
"""Content orders a plugin can be trained on: ``[text, media]`` (OpenAI's examples) and ``[media, text]``."""
MEDIA_AT = ("answer", "turn")
"""Where the media placeholders go in the rendered prompt (see the module docstring)."""


@dataclass(frozen=True)
class PromptFormat:
    """How a plugin example was rendered in training (recorded in the plugin's ``plugin.json``).

    Args:
        chat_template: the Jinja chat template the conversation is rendered with.
        enable_thinking: the template's thinking switch; False renders an empty think block.
        orders: the content orders trained on (see :data:`ORDERS`).
        media_at: ``answer`` or ``turn`` (see :data:`MEDIA_AT`).
        media_tokens: the placeholder tokens ``media_at=answer`` moves.
    """

    chat_template: str
    enable_thinking: bool = False
    orders: tuple[str, ...] = ORDERS
    media_at: str = "turn"
    media_tokens: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [o for o in self.orders if o not in ORDERS]
        if unknown or not self.orders:
            raise ValueError(f"prompt format orders {list(self.orders)}: expected a non-empty subset of {ORDERS}")
        if self.media_at not in MEDIA_AT:
            raise ValueError(f"prompt format media_at={self.media_at!r}: expected one of {MEDIA_AT}")

    @property
    def template_sha256(self) -> str:
        return hashlib.sha256(self.chat_template.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        data = {**asdict(self), "orders": list(self.orders), "media_tokens": list(self.media_tokens)}
        return {**data, "template_sha256": self.template_sha256}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptFormat:
        return cls(
            chat_template=data["chat_template"],
            enable_thinking=bool(data.get("enable_thinking", False)),
            orders=tuple(data.get("orders", ORDERS)),
            media_at=data.get("media_at", "turn"),
            media_tokens=tuple(data.get("media_tokens", ())),
        )

    @classmethod
    def for_tokenizer(
        cls,
        tokenizer,
        enable_thinking: bool = False,
        orders: tuple[str, ...] = ORDERS,
        media_at: str = "turn",
        media_tokens: tuple[str, ...] = (),
    ) -> PromptFormat:
        """The format a bundle of this tokenizer will serve: the export's chat template, thinking off."""
        return cls(bundle_chat_template(tokenizer), enable_thinking, tuple(orders), media_at, tuple(media_tokens))

    # --- rendering -------------------------------------------------------------------------
    def render(self, tokenizer, messages: list[dict[str, Any]], template_kwargs: dict[str, Any] | None = None) -> str:
        """The prompt text of ``messages`` (with the assistant's generation prompt); the server's rendering too."""
        kwargs = {"enable_thinking": self.enable_thinking, **(template_kwargs or {})}
        if self.media_at == "turn" or not self.media_tokens:
            return render_chat(tokenizer, self.chat_template, messages, kwargs)
        moved: list[str] = []
        kept = [{**m, "content": self._take_media(m.get("content"), moved)} for m in messages]
        return render_chat(tokenizer, self.chat_template, kept, kwargs) + "".join(moved)

    def _take_media(self, content: Any, moved: list[str]) -> Any:
        """``content`` without its placeholder runs (appended to ``moved`` in order of appearance)."""
        if not isinstance(content, str):
            return content
        pattern = "(" + "|".join(re.escape(t) for t in self.media_tokens) + ")+"
        moved += [m.group(0) for m in re.finditer(pattern, content)]
        return re.sub(pattern, "", content)

    def example(
        self, tokenizer, question: str, media_text: str, answer: str, order: str
    ) -> tuple[list[int], list[int]]:
        """``(prompt_ids, answer_ids)`` of one training example; ``answer_ids`` end with the end-of-turn token."""
        prompt = self.render(tokenizer, [user_turn(question, media_text, order)])
        answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
        return tokenizer(prompt, add_special_tokens=False).input_ids, [*answer_ids, end_of_turn_id(tokenizer)]


def render_chat(tokenizer, template: str | None, messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> str:
    """``apply_chat_template`` with the generation prompt: the one call every prompt goes through."""
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True, **kwargs
    )


def user_turn(question: str, media_text: str, order: str) -> dict[str, str]:
    """The user message a client sends as ``[text, media]`` (``text_first``) or ``[media, text]``."""
    if order not in ORDERS:
        raise ValueError(f"content order {order!r}: expected one of {ORDERS}")
    return {
        "role": "user",
        "content": join_content([question, media_text] if order == ORDERS[0] else [media_text, question]),
    }


def join_content(pieces: list[str]) -> str:
    """Content parts (text, or a media item's placeholders) → one message string, in order, nothing between."""
    return "".join(pieces)


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn: ChatML's ``<|im_end|>`` where the tokenizer has it, else EOS."""
    token = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(token, int) and token != tokenizer.unk_token_id and token is not None:
        return token
    return tokenizer.eos_token_id
