"""A ChatML chat template with a thinking switch, for the bundle's tokenizer.

``enable_thinking`` (a template variable, default true — what ``apply_chat_template(...,
enable_thinking=...)`` and OpenAI-style ``extra_body={"enable_thinking": ...}`` pass through):

- true: the assistant turn is left open after ``<|im_start|>assistant\\n``; the model may write
  its reasoning inside ``<think>...</think>`` before the answer.
- false: the template itself emits an empty ``<think>\\n\\n</think>\\n\\n`` block, so the model
  answers directly (the same convention as Qwen3 and GLM-4.5).

Reasoning from earlier assistant turns (anything up to the last ``</think>``) is dropped from the
history. The think tags are plain text for the tokenizer (no new token ids), so adding the template
never changes the vocabulary the decoder was trained with.
"""

from __future__ import annotations

from autoglm_train.model.thinking import THINK_CLOSE, THINK_OPEN, template_thinks

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

THINKING_CHAT_TEMPLATE = (
    "{#- ChatML with a thinking switch (autoglm-train): enable_thinking=false emits an empty think block. -#}\n"
    "{%- set thinking = enable_thinking if enable_thinking is defined else true -%}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}\n"
    "{%- else -%}{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}{%- endif -%}\n"
    f"{{%- if message['role'] == 'assistant' and '{THINK_CLOSE}' in content -%}}\n"
    f"{{%- set content = content.split('{THINK_CLOSE}')[-1].lstrip() -%}}\n"
    "{%- endif -%}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|im_start|>assistant\\n' -}}\n"
    f"{{%- if not thinking -%}}{{{{- '{THINK_OPEN}\\n\\n{THINK_CLOSE}\\n\\n' -}}}}{{%- endif -%}}\n"
    "{%- endif -%}\n"
)


def bundle_chat_template(tokenizer, override: str | None = None) -> str:
    """The template the bundle ships: ``override`` if given, the tokenizer's own if it already
    supports thinking, else the ChatML thinking template (the tokenizer must know ChatML's tokens)."""
    if override is not None:
        return override
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and "enable_thinking" in own and template_thinks(tokenizer, own):
        return own
    vocab = tokenizer.get_vocab()
    missing = [t for t in CHATML_TOKENS if t not in vocab]
    if missing:
        raise ValueError(
            f"the decoder's tokenizer lacks the ChatML tokens {missing} the default thinking template needs; "
            "pass --chat-template FILE with a template of your own"
        )
    return THINKING_CHAT_TEMPLATE
