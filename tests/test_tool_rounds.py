"""Tool rounds in a reply, end to end through the core on a scripted Llama 3 model: the call is
kept from the user, run, and answered with its result in the next prompt; the reply names the
tools that ran; bad calls, too many rounds and channels without tools."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ai_model.config import ModelSettings, SamplingSettings
from ai_model.templates import CHATML, LLAMA3
from chat.commands import tools as tool_commands
from chat.commands.spec import Invocation
from chat.messages import IncomingMessage, OutgoingReply, ReplyKind
from chat.tools import llama3
from tests.scripted import ScriptedModel

CALCULATE = '{"name": "calculate", "parameters": {"expression": "17/100*2340"}}'
ASK = "What's 17% of 2,340?"


def model(script: Sequence[str], template: Any = LLAMA3, n_ctx: int = 8191) -> ScriptedModel:
    return ScriptedModel(list(script), template=template, n_ctx=n_ctx)


def dm(text: str, key: str = "telegram:5") -> IncomingMessage:
    return IncomingMessage("telegram", key, "5", "Ann", text, is_dm=True)


async def replies(core: Any, msg: IncomingMessage) -> list[OutgoingReply]:
    return [r async for r in core.answers.respond(msg) if r.text]


async def test_a_calculation_is_computed_by_the_tool_and_its_result_reaches_the_reply(
    make_core: Any,
) -> None:
    office = model([CALCULATE, "17% of 2,340 is 397.8."])
    core = make_core({"office": office})
    shown = await replies(core, dm(ASK))
    final = shown[-1]
    assert final.final and final.kind is ReplyKind.ANSWER
    assert final.text == "17% of 2,340 is 397.8.\n\nTools used: calculate."
    assert not any('"name"' in r.text for r in shown)  # the call never reached the user
    first, second = (office.detokenize(p) for p in office.prompts)
    assert first.count(llama3.ENVIRONMENT) == 1 and '"name": "calculate"' in first  # offered
    # The second prompt is the first (its evaluated cache reused) with the call as written and
    # its result, an ipython turn, after it (the detokenized text leaves out the markup).
    assert office.prompts[1][: len(office.prompts[0])] == office.prompts[0]
    assert second[len(first) :] == f'{CALCULATE}ipython\n\n"397.8"assistant\n\n'
    conv = await core.conversations.get("telegram", "telegram:5")
    stored = await core.store.messages.history(conv.id)
    assert [m.text for m in stored] == [ASK, final.text]  # calls are not history


async def test_search_history_finds_a_message_from_before_the_window(make_core: Any) -> None:
    search = '{"name": "search_history", "parameters": {"query": "launch date"}}'
    # One token per byte: the definitions take about 3,500 of the 8,191.
    office = model(["Noted."] * 100 + [search, "We agreed on March 3rd."])
    small = {"office": ModelSettings(sampling=SamplingSettings(max_tokens=64))}
    core = make_core({"office": office}, models=small)
    key = "telegram:-77"
    say = IncomingMessage("telegram", key, "1", "Ann", "The launch date is March 3rd, agreed.")
    await replies(core, say)
    for n in range(99):  # answered chatter: pushes the launch out of the window
        await replies(core, IncomingMessage("telegram", key, "2", "Bob", f"filler {n} " * 8))
    assert "March 3rd" not in office.detokenize(office.prompts[-1])
    asked = IncomingMessage("telegram", key, "1", "Ann", "What launch date did we agree on?")
    final = (await replies(core, asked))[-1]
    assert final.text == "We agreed on March 3rd.\n\nTools used: search_history."
    result = office.detokenize(office.prompts[-1])
    assert "Ann: The launch date is March 3rd, agreed." in result.split("ipython")[-1]


async def test_a_bad_call_is_answered_to_the_model_once_then_the_user_is_told(
    make_core: Any,
) -> None:
    unknown = '{"name": "launch_rockets", "parameters": {}}'
    invalid = '{"name": "calculate", "parameters": {"expression": 5}}'
    office = model([unknown, "Sorry, I can do sums only.", unknown, invalid, "never"])
    core = make_core({"office": office})
    once = (await replies(core, dm("Launch the rockets.")))[-1]
    assert once.text == "Sorry, I can do sums only."  # no tool ran: no line
    error = office.detokenize(office.prompts[1])
    assert "there is no tool called 'launch_rockets'" in error.split("ipython")[-1]
    twice = (await replies(core, dm("Launch them now.")))[-1]
    assert twice.kind is ReplyKind.NOTICE and "could not finish this with my tools" in twice.text
    assert "invalid expression" in twice.text
    assert len(office.prompts) == 4  # the second bad call was not answered to the model


async def test_a_reply_runs_at_most_max_rounds_tools(make_core: Any) -> None:
    office = model([CALCULATE] * 5)
    core = make_core({"office": office})
    final = (await replies(core, dm(ASK)))[-1]
    assert final.kind is ReplyKind.NOTICE and "more than 3 tools" in final.text
    assert len(office.prompts) == 4  # three rounds, then the fourth call is not run


async def test_channels_without_tools_and_other_formats_get_plain_prompts(make_core: Any) -> None:
    office = model([CALCULATE])
    core = make_core({"office": office})
    ann = Invocation("telegram", "telegram:5", "5", "Ann", True)
    assert "on here: current_time, calculate" in (await tool_commands.tools_show(core, ann)).text
    command = core.commands.find("tools", "telegram")
    parsed = core.commands.parse(command, "off")
    off = await core.commands.run(parsed.command, ann)
    assert "off" in off.text and "off here" in (await tool_commands.tools_show(core, ann)).text
    final = (await replies(core, dm(ASK)))[-1]
    assert final.text == CALCULATE  # said as it is: nothing runs without tools
    assert llama3.ENVIRONMENT not in office.detokenize(office.prompts[-1])
    chatml = model([CALCULATE], template=CHATML)  # a template that takes no tools
    core = make_core({"office": chatml})
    assert (await replies(core, dm(ASK, key="telegram:6")))[-1].text == CALCULATE
    assert "calculate" not in chatml.detokenize(chatml.prompts[-1])
    assert chatml.grammars == [None]


async def test_the_engines_tool_prompt_is_the_llama_3_1_templates_own_token_for_token(
    make_core: Any,
) -> None:
    """The prompt of a reply's second round, as the engine builds it on the real Llama 3
    vocabulary with the vendored Llama 3.1 template, equals that template's own rendering of
    the same conversation with the tool definitions, tokenized with special tokens."""
    from ai_model.jinja_format import token_text
    from ai_model.jinja_render import Renderer
    from tests.vendored import load_template, models_dir, vocabulary

    folder = models_dir()
    path = folder / "meta-llama-Llama-3.1-8B-Instruct.jinja"
    template = load_template(folder, path).template
    assert template is not None
    llm = vocabulary(folder, "llama-bpe")
    bos = tuple(llm.tokenize(b"", True, True))
    office = ScriptedModel([CALCULATE, "It is 397.8."], template=template, tokenizer=llm, bos=bos)
    core = make_core({"office": office})
    assert (await replies(core, dm(ASK)))[-1].text.startswith("It is 397.8.")

    def piece(token: int) -> bytes:
        return bytes(llm.detokenize([token], special=True))

    begin = token_text(piece, llm.token_bos())
    render = Renderer(path.read_text(encoding="utf-8"), begin, token_text(piece, llm.token_eos()))
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": core.settings.system_prompt},
        {"role": "user", "content": ASK},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "calculate", "arguments": {"expression": "17/100*2340"}},
                }
            ],
        },
        {"role": "tool", "content": "397.8"},
    ]
    definitions = core.answers.tool_use.tools.definitions()
    text = render(messages, True, tools=definitions).removeprefix(begin)
    theirs = [*bos, *llm.tokenize(text.encode(), add_bos=False, special=True)]
    assert office.prompts[1] == theirs
