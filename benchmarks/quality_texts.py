"""Texts for the quality benchmark: what installs with Python or its packages, and passkey prompts.

* ``code``: the source of ``transformers/modeling_utils.py`` (Python code and docstrings).
* ``prose``: the IDLE user guide (``idlelib/help.html`` of the standard library), HTML stripped:
  English documentation prose. If it is shorter than the evaluation length, the Python language
  reference shipped in ``pydoc_data/topics.py`` (English prose about the language) continues it.
* passkey prompts: a 5-digit key hidden at a depth of a repetitive filler, asked back at the end.
"""

from __future__ import annotations

import html.parser
import importlib.util
import random
import re
from dataclasses import dataclass
from pathlib import Path


def _module_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {name!r} is not installed")
    return Path(spec.origin).parent


class _TextOnly(html.parser.HTMLParser):
    """Collects the text of an HTML page, skipping scripts, styles and the navigation."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def code_text() -> str:
    return (_module_dir("transformers") / "modeling_utils.py").read_text()


def prose_text() -> str:
    parser = _TextOnly()
    parser.feed((_module_dir("idlelib") / "help.html").read_text())
    guide = re.sub(r"\n\s*\n+", "\n\n", "".join(parser.parts)).replace("\u00b6", "")
    from pydoc_data import topics  # the language reference, one entry per topic

    reference = "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    return guide + "\n\n" + reference


TEXTS = {"code": code_text, "prose": prose_text}

# ----------------------------------------------------------------------------- passkey
_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n\n"
)
_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
_QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class Passkey:
    """One passkey prompt: ``ids`` ends with the key's tokens (the last ``answer_len``), scored."""

    ids: list[int]
    answer_len: int
    depth: float
    key: str


def passkey_prompt(
    tokenizer, depth: float, n_tokens: int, seed: int, haystack: list[int] | None = None
) -> Passkey:
    """A prompt of at most ``n_tokens`` tokens with a random 5-digit key at ``depth`` of the filler.

    The filler sentence repeats and the key sentence sits after ``round(depth * repeats)`` of
    them; or, given ``haystack`` token ids (real text), the key sits at that share of its tokens.
    """
    key = str(random.Random(seed).randrange(10000, 100000))
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    needle = encode(f"The pass key is {key}. Remember it. {key} is the pass key. ")
    answer = encode(f" {key}")
    head, filler, tail = encode(_INTRO), encode(_FILLER), encode(_QUESTION)
    if haystack is not None:
        room = n_tokens - len(head) - len(needle) - len(tail) - len(answer)
        before = round(depth * room)
        hay = list(haystack[:room])
        ids = head + hay[:before] + needle + hay[before:] + tail + answer
        return Passkey(ids=ids, answer_len=len(encode(key)), depth=depth, key=key)
    repeats = (n_tokens - len(head) - len(needle) - len(tail) - len(answer)) // len(filler)
    before = round(depth * repeats)
    ids = head + filler * before + needle + filler * (repeats - before) + tail + answer
    digits = encode(key)  # the score counts the key's own tokens, not the space before it
    if answer[-len(digits) :] != digits:
        raise ValueError(f"the tokenizer splits {key!r} differently after a space")
    return Passkey(ids=ids, answer_len=len(digits), depth=depth, key=key)
