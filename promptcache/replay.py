"""Token-exact replay: chat turns render our own earlier answers with the ids we generated, not re-tokenized text.

Re-tokenizing an answer's text can give other ids than the model produced (BPE merges differ at boundaries);
then the next turn misses the cache from the answer on. We remember, per namespace, the ids behind each answer
text we returned, and splice them into the rendered prompt in place of the text.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from promptcache.tokenizer import Tokenizer


class ReplayStore:
    """A bounded LRU map (namespace, answer text) -> the token ids that produced it."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, str], tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, namespace: str, text: str, token_ids: Sequence[int]) -> None:
        if not text or not token_ids:
            return
        with self._lock:
            self._entries[(namespace, text)] = tuple(token_ids)
            self._entries.move_to_end((namespace, text))
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def lookup(self, namespace: str, text: str) -> tuple[int, ...] | None:
        with self._lock:
            ids = self._entries.get((namespace, text))
            if ids is not None:
                self._entries.move_to_end((namespace, text))
            return ids

    def __len__(self) -> int:
        return len(self._entries)


def replay_ids(tokenizer: Tokenizer, output_ids: Sequence[int], text: str, eos_ids: frozenset[int]) -> list[int] | None:
    """The ids to remember for an answer: its tokens without the stop token the template writes itself.

    None when the ids do not decode to exactly ``text`` (e.g. a stop string cut the text mid-token).
    """
    ids = list(output_ids)
    while ids and ids[-1] in eos_ids:
        ids.pop()
    return ids if tokenizer.decode(ids) == text else None


def render_chat_ids(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    store: ReplayStore | None,
    namespace: str,
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> list[int]:
    """Render messages with the chat template and tokenize, splicing remembered ids for our own answers."""
    spliced: dict[str, tuple[int, ...]] = {}
    patched: list[dict[str, Any]] = []
    for msg in messages:
        content = msg.get("content")
        ids = (
            store.lookup(namespace, content)
            if store and msg.get("role") == "assistant" and isinstance(content, str)
            else None
        )
        if ids is None:
            patched.append(msg)
            continue
        marker = f"\x00replay-{uuid.uuid4().hex}\x00"
        spliced[marker] = ids
        patched.append({**msg, "content": marker})
    text = tokenizer.apply_chat_template(
        patched, tools=tools, add_generation_prompt=add_generation_prompt, **template_kwargs
    )
    if not spliced:
        return tokenizer.encode(text, add_special_tokens=False)
    out: list[int] = []
    rest = text
    for marker, ids in spliced.items():
        before, found, rest = rest.partition(marker)
        if not found:  # the template dropped or rewrote the content: fall back to plain text for everything
            return render_chat_ids(
                tokenizer, messages, None, namespace, tools, add_generation_prompt, **template_kwargs
            )
        out.extend(tokenizer.encode(before, add_special_tokens=False))
        out.extend(ids)
    out.extend(tokenizer.encode(rest, add_special_tokens=False))
    return out
