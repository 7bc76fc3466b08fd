"""Prompt beginnings that fresh conversations share: the system prompt, a character card.

Most new conversations begin like others did.  The batched scheduler notes the beginning of each
fresh prompt it evaluates (one with nothing resident or parked for it).  Once a fresh prompt
begins with at least ``MIN_USEFUL_PREFIX`` tokens that another conversation's fresh prompt also
began with, the scheduler evaluates that shared part in a chunk of its own and keeps a copy of
the sequence's state here.  Later fresh conversations beginning the same way start from that
copy and evaluate only the rest, as llama-server's slots do with their cached prompts.

Only whole turns are shared: a shared beginning ends right after a control token (a turn's chat
markup), or after the rest of the next turn's opening markup (ChatML's ``user\n`` after
``<|im_start|>``, which every conversation's first message has), never inside a message's
text.  So a fresh conversation's speed can tell a user no more than that some other
conversation began with the same turns (usually the system prompt everyone gets).  A
conversation's own earlier prompts never count as "another conversation".
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

from ai_model.parking import MIN_USEFUL_PREFIX, SavedState, common_prefix

KEEP = 4  # shared beginnings held at once (least recently used goes first)
REMEMBER = 16  # fresh prompts whose beginnings are compared with the next one
COMPARED = 2048  # tokens of each such prompt that are kept for the comparison


def whole_turns(n: int, prompt: Sequence[int], is_control: Callable[[int], bool]) -> int:
    """``n`` cut back to end right after a control token of ``prompt`` (0 if none comes
    before it): what another conversation may reuse never reaches into a message's text."""
    while n > 0 and not is_control(prompt[n - 1]):
        n -= 1
    return n


def through_opening(
    n: int, prompt: Sequence[int], limit: int, openings: Sequence[Sequence[int]]
) -> int:
    """``n`` (right after a control token) moved past the rest of a turn opening that begins
    before it, if the prompt holds that whole opening within ``limit`` tokens: the template's
    own markup, the same in every conversation, never a message's text."""
    best = n
    for opening in openings:
        for p in range(1, min(len(opening), n + 1)):
            end = n - p + len(opening)
            if end > best and end <= limit and list(prompt[n - p : end]) == list(opening):
                best = end
    return best


class SharedPrefixes:
    """Copies of sequence states holding only a beginning that fresh prompts share.

    ``openings`` are the token ids of the template's turn openings (markup only).
    """

    def __init__(
        self,
        max_bytes: int,
        is_control: Callable[[int], bool],
        openings: Sequence[Sequence[int]] = (),
    ) -> None:
        self.max_bytes = max_bytes
        self._is_control = is_control
        self._openings = [tuple(o) for o in openings if o]
        self._states: OrderedDict[tuple[int, ...], SavedState] = OrderedDict()
        self._recent: deque[tuple[str | None, tuple[int, ...]]] = deque(maxlen=REMEMBER)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._states.values())

    def find(self, prompt: Sequence[int]) -> SavedState | None:
        """The held beginning sharing the most with ``prompt`` (the prompt's last token is
        always evaluated again, for its logits), if it shares enough to be worth loading."""
        best, most = None, MIN_USEFUL_PREFIX - 1
        for state in self._states.values():
            n = min(common_prefix(state.tokens, prompt), len(prompt) - 1)
            if n > most:
                best, most = state, n
        if best is not None:
            self._states.move_to_end(best.tokens)
        return best

    def boundary(self, key: str | None, prompt: Sequence[int]) -> int:
        """Where to copy the state while ``prompt`` is evaluated (0: nowhere): the end of the
        longest beginning it shares with another conversation's fresh prompt, cut back to a
        turn boundary.  Notes ``prompt`` for the prompts after it."""
        if self.max_bytes <= 0:  # off: nothing is noted either
            return 0
        shared = 0
        for other_key, other in self._recent:
            if key is None or other_key != key:
                shared = max(shared, common_prefix(other, prompt))
        self._recent.append((key, tuple(prompt[:COMPARED])))
        limit = min(shared, len(prompt) - 1)
        n = whole_turns(limit, prompt, self._is_control)
        n = through_opening(n, prompt, limit, self._openings) if n else 0
        if n < MIN_USEFUL_PREFIX or tuple(prompt[:n]) in self._states:
            return 0
        return n

    def add(self, state: SavedState) -> None:
        """Hold ``state``, dropping the least recently used ones past the budget or ``KEEP``."""
        if state.nbytes > self.max_bytes:
            return
        self._states[state.tokens] = state
        self._states.move_to_end(state.tokens)
        while self.nbytes > self.max_bytes or len(self._states) > KEEP:
            self._states.popitem(last=False)
