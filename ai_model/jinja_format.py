"""A chat format derived from the model's own Jinja template (``chat_template = "auto"``).

The template is rendered in a sandbox, as Hugging Face's ``apply_chat_template`` renders it
(``bos_token``, ``eos_token``, ``add_generation_prompt``, ``raise_exception``,
``strftime_now``, the ``generation`` tag), bounded in time and output size.  Every message's
content is a unique placeholder, so no user text ever passes through the template: the rendered
text is split at the placeholders, and what lies between them is the format's markup.  From
that markup comes a :class:`ai_model.templates.ChatTemplate` (each role's opening and closing,
the reply's cue, the head), adapted to what the template accepts:

- no system role: the system part is folded into a user turn;
- strict user/assistant alternation: consecutive turns of one role are merged.

Then it is checked: the format's rendering of several conversations must equal the template's
own, character for character and token for token, and appending a turn must extend the prompt
(prefix reuse).  A template that fails is refused with the reason.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import replace

from ai_model.base import ModelError
from ai_model.jinja_render import Exceeded, Message, Refused, Renderer
from ai_model.templates import _MARKER as MARKER
from ai_model.templates import (
    TEMPLATES,
    ChatTemplate,
    Tokenizer,
    UnknownTemplateError,
    adapt,
    encode,
    frame,
    framed,
    plain_text_leaks,
    template_by_name,
)


def _placeholder(i: int) -> str:
    return f"LBx{i}qZ"


def _messages(roles: Sequence[str], contents: Sequence[str] | None = None) -> list[Message]:
    return [
        {"role": role, "content": contents[i] if contents else _placeholder(i)}
        for i, role in enumerate(roles)
    ]


def _segments(rendered: str, count: int) -> list[str] | None:
    """``rendered`` cut at the placeholders 0..count-1, in order; None if one is missing."""
    segments = []
    rest = rendered
    for i in range(count):
        head, found, rest = rest.partition(_placeholder(i))
        if not found:
            return None
        segments.append(head)
    segments.append(rest)
    return segments


def _accepts(render: Renderer, roles: Sequence[str]) -> bool:
    try:
        out = render(_messages(roles), True)
    except Exceeded:
        raise
    except Refused:
        return False
    return all(_placeholder(i) in out for i in range(len(roles)))


def _common_suffix(texts: Sequence[str]) -> str:
    first = texts[0]
    n = 0
    while n < len(first) and all(len(t) > n and t[-1 - n] == first[-1 - n] for t in texts):
        n += 1
    return first[len(first) - n :]


def _frame(
    render: Renderer, system: bool, strip_bos: bool
) -> tuple[dict[tuple[str | None, str], str], str]:
    """The markup between placeholders, by (previous role, role), and the cue after a user
    turn, from renderings of a few conversations (``strip_bos``: without the BOS the template
    writes first, which the tokenizer adds)."""
    first = ["system"] if system else []
    shapes = [
        [*first, "user", "assistant", "user", "assistant", "user"],
        [*first, "user", "user", "assistant", "user"],
        [*first, "user", "assistant", "assistant", "user"],
    ]
    if system:
        shapes.append(["system", "assistant", "user"])
    joints: dict[tuple[str | None, str], str] = {}
    cues: set[str] = set()
    for roles in shapes:
        if not _accepts(render, roles):
            continue
        rendered = render(_messages(roles), True)
        if strip_bos and render.bos and rendered.startswith(render.bos):
            rendered = rendered[len(render.bos) :]
        segments = _segments(rendered, len(roles))
        if segments is None:
            raise Refused("a message's content is missing from the template's output")
        previous: str | None = None
        for role, segment in zip(roles, segments, strict=False):
            known = joints.setdefault((previous, role), segment)
            if known != segment:
                raise Refused(
                    f"the markup between a {previous or 'start'} and a {role} turn depends on "
                    "where they stand in the conversation"
                )
            previous = role
        cues.add(segments[-1])
    if len(cues) != 1:
        raise Refused("the reply's cue depends on the conversation")
    return joints, cues.pop()


def _separate(
    joints: dict[tuple[str | None, str], str], cue: str
) -> tuple[dict[str, str], dict[str, str], str, str, bool, bool]:
    """:func:`_split`, leaving out the pairs of one role in a row when only they stand in the
    way: (open, close, cue, head, merges users, splits assistants)."""
    last: Refused | None = None
    for merges, splits in ((False, False), (False, True), (True, False), (True, True)):
        kept = {
            pair: joint
            for pair, joint in joints.items()
            if not (merges and pair == ("user", "user"))
            and not (splits and pair == ("assistant", "assistant"))
        }
        merges = merges or ("user", "user") not in joints
        splits = splits or ("assistant", "assistant") not in joints
        try:
            return (*_split(kept, cue), merges, splits)
        except Refused as exc:
            last = last or exc
    assert last is not None
    raise last


def _split(
    joints: dict[tuple[str | None, str], str], cue: str
) -> tuple[dict[str, str], dict[str, str], str, str]:
    """Split each joint into the previous turn's close and this turn's open: (open, close,
    cue, head).  Preferably every turn ends the same way and each opening starts at a marker
    (``<|im_end|>\n`` + ``<|im_start|>user\n``); else each role's opening is the longest one
    every joint into it shares."""
    uniform = _split_uniform(joints, cue)
    if uniform is not None:
        return uniform
    opens: dict[str, str] = {}
    for role in {r for _, r in joints}:
        opens[role] = _common_suffix([j for (_, r), j in joints.items() if r == role])
    closes: dict[str | None, str] = {}
    for (previous, role), joint in joints.items():
        close = joint[: len(joint) - len(opens[role])]
        if closes.setdefault(previous, close) != close:
            raise Refused(f"how a {previous or 'start'} turn ends depends on the turn after it")
    head = closes.pop(None, "")
    return _finish(opens, closes, cue, head)


def _finish(
    opens: dict[str, str], closes: dict[str | None, str], cue: str, head: str
) -> tuple[dict[str, str], dict[str, str], str, str]:
    user_close = closes.get("user", "")
    if not cue.startswith(user_close):
        raise Refused("the reply's cue does not follow the end of a user turn")
    for role in opens:
        closes.setdefault(role, "")
    return opens, {r: c for r, c in closes.items() if r is not None}, cue[len(user_close) :], head


def _split_uniform(
    joints: dict[tuple[str | None, str], str], cue: str
) -> tuple[dict[str, str], dict[str, str], str, str] | None:
    """The split with one close for every role, at a marker's end or a line's end, and
    openings that start with a marker; None if there is none."""
    inner = [j for (previous, _), j in joints.items() if previous is not None]
    if not inner:
        return None
    shared = inner[0]
    for joint in inner[1:]:
        n = 0
        while n < min(len(shared), len(joint)) and shared[n] == joint[n]:
            n += 1
        shared = shared[:n]
    ends = {0} | {m.end() for m in MARKER.finditer(shared)}
    ends |= {i + 1 for i, ch in enumerate(shared) if ch == "\n"}
    for cut in sorted(ends, reverse=True):
        close = shared[:cut]
        opens: dict[str, str] = {}
        fits = True
        for (previous, role), joint in joints.items():
            if previous is None:
                continue
            opening = joint[cut:]
            if opens.setdefault(role, opening) != opening or (
                opening and not MARKER.match(opening)
            ):
                fits = False
                break
        if not fits or not cue.startswith(close):
            continue
        head = ""
        for (previous, role), joint in joints.items():
            if previous is None:
                known = opens.get(role)
                if known is None:  # a role that only ever comes first (the system)
                    first = MARKER.search(joint)
                    known = opens[role] = joint[first.start() :] if first else joint
                opening = known
                if not joint.endswith(opening):
                    fits = False
                    break
                head = joint[: len(joint) - len(opening)]
        if fits:
            closes: dict[str | None, str] = {role: close for role in opens}
            return _finish(opens, closes, cue, head)
    return None


def _reasoning(render: Renderer, template: ChatTemplate) -> tuple[str, str] | None:
    """The reasoning block the template drops from earlier replies, if it does."""
    source = template.source
    for open_, close in (("<think>", "</think>"), ("<|begin_of_thought|>", "<|end_of_thought|>")):
        if close not in source:
            continue
        roles = [*(["system"] if template.system_role else []), "user", "assistant", "user"]
        contents = ["Be brief.", "Hi.", f"{open_}\nWONDERQ\n{close}\n\nHello.", "Bye."][
            -len(roles) :
        ]
        try:
            out = render(adapted(template, list(zip(roles, contents, strict=True))), True)
        except Refused:
            continue
        if "WONDERQ" not in out:
            return (open_, close)
    return None


BENIGN = (
    ("system", "You are a helpful assistant. Answer briefly."),
    ("user", "Hello! What is 2 + 2?"),
    ("assistant", "It is 4."),
    ("user", "Thanks. And 3 + 3?"),
)
TWO_USERS = (
    ("system", "You are a helpful assistant."),
    ("user", "Ann: Hello there."),
    ("user", "Bob: Good morning, everyone!"),
)
LONGER = (
    *BENIGN,
    ("assistant", "That is 6."),
    ("user", "Great, see you tomorrow."),
)


def adapted(template: ChatTemplate, turns: Sequence[tuple[str, str]]) -> list[Message]:
    """``turns`` as messages the template renders, adapted as the format adapts them."""
    return [{"role": t.role, "content": t.text} for t in adapt(template, turns)]


def check(
    template: ChatTemplate,
    render: Renderer,
    tokenizer: Tokenizer,
    adds_bos: Sequence[int],
) -> None:
    """Refuse unless the format renders as the template does, text and tokens, for the benign
    conversations, and each conversation's prompt extends the one before it."""
    previous: list[int] = []
    for conversation in (BENIGN[:2], BENIGN, LONGER, TWO_USERS):
        ours = frame(template, conversation)
        text = "".join(p.text for p in ours)
        theirs = render(adapted(template, conversation), True)
        if theirs.startswith(render.bos) and adds_bos:
            theirs = theirs[len(render.bos) :]
        if text != theirs:
            raise Refused(
                f"the derived format does not reproduce the template ({_diff(text, theirs)})"
            )
        mine = [*adds_bos, *encode(ours, tokenizer)]
        whole = [
            *adds_bos,
            *tokenizer.tokenize(theirs.encode("utf-8"), add_bos=False, special=True),
        ]
        if mine != whole:
            raise Refused(
                "the template's text tokenizes differently when its turns are tokenized apart"
            )
        if conversation is LONGER:
            cut = mine[: len(previous) - len(encode(template.generation_prompt(), tokenizer))]
            if previous and mine[: len(cut)] != cut:
                raise Refused("appending a turn changes the earlier prompt (no prefix reuse)")
        previous = mine


def _diff(ours: str, theirs: str) -> str:
    n = 0
    while n < min(len(ours), len(theirs)) and ours[n] == theirs[n]:
        n += 1
    return (
        f"first difference at {n}: ours {ours[n : n + 30]!r}, the template's {theirs[n : n + 30]!r}"
    )


def derive_template(
    source: str,
    tokenizer: Tokenizer,
    *,
    bos: str,
    eos: str,
    adds_bos: Sequence[int],
    day: datetime.date | None = None,
) -> ChatTemplate:
    """The format the template ``source`` describes, checked against its own rendering with
    ``tokenizer``; raises :class:`Refused` saying why it cannot be framed."""
    render = Renderer(source, bos, eos, day)
    if not _accepts(render, ["user"]):
        raise Refused("the template refuses a conversation of one user message")
    trims = " LBx0qZ " not in render([{"role": "user", "content": " LBx0qZ "}], True)
    last: Refused | None = None
    for system in (True, False):  # fold the system part into a user turn if need be
        if system and not _accepts(render, ["system", "user"]):
            continue
        try:
            # BOS exactly once: when the tokenizer adds it, the template's own goes.
            joints, cue = _frame(render, system, strip_bos=bool(adds_bos))
            opens, closes, cue, head, merges, splits = _separate(joints, cue)
            template = framed(
                "auto",
                opens,
                closes,
                cue,
                head=head,
                system_role=system,
                merges_users=merges,
                splits_assistants=splits,
                merges_systems=True,  # most templates read only the first system message
                trims=trims,
                stop=_stops(closes, opens),
                source=source,
            )
            template = replace(template, reasoning=_reasoning(render, template))
            check(template, render, tokenizer, adds_bos)
            return _named(template)
        except Refused as exc:
            last = last or exc  # the reason with the system role is the one worth telling
    raise last or Refused("the template has no usable system or user turn")


def _stops(closes: dict[str, str], opens: dict[str, str]) -> tuple[str, ...]:
    """Text that ends a reply if the model writes it as text: the first marker of the
    assistant's closing and of the user's opening markup."""
    found = []
    for markup in (closes.get("assistant", ""), opens.get("user", "")):
        markers = MARKER.findall(markup)
        if markers:
            found.append(markers[0])
        elif markup.strip():
            found.append(markup.strip())
    return tuple(dict.fromkeys(found))


def _named(template: ChatTemplate) -> ChatTemplate:
    """A written-out format with exactly this markup, if there is one (its name reads better)."""
    for known in TEMPLATES.values():
        if (
            dict(known.open) == dict(template.open)
            and dict(known.close) == dict(template.close)
            and known.cue == template.cue
            and known.head == template.head
            and known.trims == template.trims
        ):
            return replace(known, source=template.source)  # the source says what else it takes
    return template


def choose_template(
    name: str,
    source: str | None,
    tokenizer: Tokenizer,
    *,
    bos: str,
    eos: str,
    adds_bos: Sequence[int],
    is_control: Callable[[int], bool] | None = None,
) -> ChatTemplate:
    """The format a model role uses: a named one, or (``auto``) its own template's."""
    if name != "auto":
        return template_by_name(name)
    if not source:
        raise Refused(
            "the model file has no chat template; name its format with chat_template "
            f"({', '.join(TEMPLATES)})"
        )
    return derive_template(source, tokenizer, bos=bos, eos=eos, adds_bos=adds_bos)


def template_for(
    chat_template: str,
    source: str | None,
    tokenizer: Tokenizer,
    *,
    bos: str,
    eos: str,
    adds_bos: Sequence[int],
    is_control: Callable[[int], bool],
    model: str,
) -> ChatTemplate:
    """The checked format of a model file, or one :class:`ModelError` naming the model, the
    template and the reason: a template that cannot be framed safely, or markup its
    vocabulary would turn into control tokens even in plain text."""
    which = "its own template" if chat_template == "auto" else f"the {chat_template} format"
    try:
        template = choose_template(
            chat_template, source, tokenizer, bos=bos, eos=eos, adds_bos=adds_bos
        )
    except UnknownTemplateError as exc:
        raise ModelError(
            f"refusing {model}: {which} cannot be used: {exc}. Set chat_template to one of: "
            f"{', '.join(TEMPLATES)}"
        ) from exc
    leaks = plain_text_leaks(template, tokenizer, is_control)
    if leaks:
        raise ModelError(
            f"refusing {model} with {which}: its vocabulary turns the chat markup "
            f"{', '.join(repr(m) for m in leaks[:4])} into control tokens even in plain text, "
            "so users could write their own turns. Use a GGUF whose tokenizer marks these "
            "tokens as control tokens (not user-defined)."
        )
    return template


def token_text(piece: Callable[[int], bytes], token: int) -> str:
    """A special token's own text (its piece with special tokens shown); "" for none."""
    return piece(token).decode("utf-8", "replace") if token >= 0 else ""
