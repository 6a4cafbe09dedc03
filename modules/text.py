"""Text utilities: everything public here is exposed (introspection mode)."""

import re
import unicodedata
from collections import Counter

__all_exposed__ = "*"


def slugify(text: str, separator: str = "-") -> str:
    """A URL-safe lower-case slug: `POST /rest/slugify/Hello%20World` gives `hello-world`."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    return separator.join(words)


def word_count(text: str, top: int = 3) -> dict[str, object]:
    """How many words a text has, and its most frequent ones."""
    words = re.findall(r"\w+", text.lower())
    return {"words": len(words), "top": Counter(words).most_common(top)}


def _normalise(text: str) -> str:  # private: never exposed, even in "*" mode
    return " ".join(text.split())
