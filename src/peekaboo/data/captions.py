"""Captions that list a synthetic scene's objects, in the forms both scene sets (shapes, objects) use."""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["CAPTION_FORMS", "CAPTION_WORD_BUDGET", "FILLER_WORDS", "article", "caption_words", "content_words",
           "list_caption"]

#: ``"a red circle and a blue square"``, ``"the red circle and the blue square"``, ``"red circle, blue square"``,
#: ``"a red circle, a blue square and a green triangle"``.
CAPTION_FORMS: tuple[str, ...] = ("and", "the", "comma", "list")
#: Words a caption may hold (commas count as words): the bundled tokenizers' 16 positions, less their
#: <|startoftext|> and <|endoftext|>, with one token per scene word. Longer forms fall back to "comma".
CAPTION_WORD_BUDGET = 14
#: Caption words that name no object.
FILLER_WORDS = frozenset({"a", "an", "the", "and"})


def article(name: str) -> str:
    """``"an"`` before a vowel sound (``"an apple"``), else ``"a"`` (``"a dog"``)."""
    return "an" if name[:1].lower() in "aeiou" else "a"


def content_words(caption: str) -> list[str]:
    """The words of a caption that name objects: every word but :data:`FILLER_WORDS`, commas dropped."""
    return [w for w in caption.replace(",", " ").split() if w not in FILLER_WORDS]


def caption_words(caption: str) -> int:
    """Words of a caption, commas counted as words (each is one token of the bundled tokenizers)."""
    return len(caption.replace(",", " ,").split())


def list_caption(names: Sequence[str], form: str = "and", max_words: int | None = None,
                 article: Callable[[str], str] = lambda name: "a") -> str:
    """The caption listing ``names`` in order, in one of :data:`CAPTION_FORMS`.

    Args:
        names: the objects' names, in caption order (``"red circle"``, ``"fire truck"``).
        form: ``"and"`` gives ``"a red circle and a blue square"``.
        max_words: when the caption would be longer (commas count as words), the compact ``"comma"`` form is
            used instead; None = no limit.
        article: the indefinite article of a name (``"a"`` or ``"an"``).

    Raises:
        ValueError: an unknown form.
    """
    if form == "and":
        caption = " and ".join(f"{article(n)} {n}" for n in names)
    elif form == "the":
        caption = " and ".join(f"the {n}" for n in names)
    elif form == "comma":
        caption = ", ".join(names)
    elif form == "list":
        listed = [f"{article(n)} {n}" for n in names]
        caption = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]
    else:
        raise ValueError(f"unknown caption form {form!r}; expected one of {CAPTION_FORMS}")
    if max_words is not None and form != "comma" and caption_words(caption) > max_words:
        return list_caption(names, "comma")
    return caption
