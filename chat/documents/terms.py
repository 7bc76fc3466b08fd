"""What the full-text index holds for a chunk, and the terms a question is searched with.

The words are stemmed here (Snowball's English stemmer), not by the database: the index of
either backend holds the same terms (SQLite's ``unicode61`` tokenizer and PostgreSQL's
``simple`` configuration only split and lowercase), and the search can look up how common a
term is by the exact term it stores.

Both backends split text into words at spaces and punctuation, which finds nothing in Chinese
or Japanese, written without spaces.  So runs of those scripts are indexed (and searched) as
overlapping character pairs, each spelled as one ASCII word (``cjk4e2d6587``).
"""

from __future__ import annotations

import functools
import itertools

import regex
import snowballstemmer

_CJK_RUN = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]+")
_WORD = regex.compile(r"[\p{L}\p{N}]+")
MAX_TERMS = 32

# Words that say nothing about which chunk is meant (the question's grammar).
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself
    yourselves tell please say says said know let us give show find document documents file
    files pdf docx page pages according""".split()  # noqa: SIM905
)


_STEMMER = snowballstemmer.stemmer("english")


@functools.lru_cache(maxsize=65536)  # prose repeats its words: most are stemmed once
def _stem(word: str) -> str:
    return word if not word.isalpha() or not word.isascii() else _STEMMER.stemWord(word)


def _pairs(run: str) -> list[str]:
    if len(run) == 1:
        return [f"cjk{ord(run):x}"]
    return [f"cjk{ord(a):x}{ord(b):x}" for a, b in itertools.pairwise(run)]


def _words(text: str) -> list[str]:
    paired = _CJK_RUN.sub(lambda m: " " + " ".join(_pairs(m.group())) + " ", text.lower())
    return _WORD.findall(paired)


def search_text(text: str) -> str:
    """What the index holds for ``text``: its stemmed words, CJK runs as character pairs."""
    return " ".join(_stem(w) for w in _words(text))


def query_terms(text: str, limit: int = MAX_TERMS) -> list[str]:
    """Search terms for ``text`` as the index holds them: its telling words (stemmed) and CJK
    pairs, first ones first."""
    terms: list[str] = []
    for word in _words(text):
        if word in STOPWORDS or (len(word) < 2 and not word.isdigit()):
            continue
        term = _stem(word)
        if term not in terms:
            terms.append(term)
        if len(terms) >= limit:
            break
    return terms
