"""Chat messages → one prompt string.

The tokenizer's own chat template is used when it has one. Otherwise (the tiny local models have none)
zoserve's documented default applies: one line per message, `<role>: <content>`, then `assistant:` so the
model continues as the assistant:

    system: You are terse.
    user: Hello
    assistant:
"""

from __future__ import annotations

from collections.abc import Sequence

from service.inference.schemas import ChatMessage

DEFAULT_CHAT_TEMPLATE_DOC = __doc__


def render_chat(tokenizer, messages: Sequence[ChatMessage]) -> str:
    if getattr(tokenizer, "chat_template", None):
        plain = [{"role": m.role, "content": m.content or ""} for m in messages]
        return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    lines = [f"{m.role}: {m.content or ''}" for m in messages]
    return "\n".join(lines) + "\nassistant:"
