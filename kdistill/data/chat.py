"""Chat data for the instruction task: prompt -> response rows read from JSON Lines, rendered and tokenised with
a model's own chat template (the response-only targets of such rows: data.next_token_targets with each row's
prompt length).

A row is `{"messages": [...]}` (OpenAI style: {"role", "content"} with roles system, user and assistant; a final
assistant message is the gold response) or `{"prompt": "...", "completion": "..."}` (the prompt is one user
message; the completion is optional). A row without a response is a prompt for the teacher to answer. A message's
other keys (e.g. "name", "weight") are not read. A row's other keys (e.g. "answer", "labels", "entities") are kept as
the example's `fields` for its scorer.

Encoding (`encode_chat`): special tokens come only from the chat template. A message's content is text: a literal
"<|im_start|>" or "[SEP]" in it is split into ordinary tokens (`split_special_tokens`), so a user cannot forge a
turn. The response's targets are its content followed by the end of turn the template writes after an assistant
message (e.g. "<|im_end|>"), so the student learns to stop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import jinja2

from kdistill.data.readers import _json, show
from kdistill.errors import LINE_BREAK, DataError, UserError, decode_utf8, encode_utf8

ROLES = ("system", "user", "assistant")
"""The roles a message may have."""

_FORMAT = ('expected {"messages": [{"role": "user", "content": ...}, ...]} or {"prompt": "...", "completion": '
           '"..."}')
_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


@dataclass(frozen=True)
class ChatExample:
    """One conversation: the prompt the model answers and, when the row has one, the gold response."""

    prompt: tuple[dict, ...]
    """The messages up to and including the last user turn, each {"role", "content"}."""
    response: str | None
    """The assistant's reply after the last user turn; None: a prompt only, for the teacher to answer."""
    fields: dict
    """The row's other keys (e.g. "answer", "labels", "entities"), for scorers."""
    where: str
    """Where the row comes from, "path:line"."""


@dataclass(frozen=True)
class EncodedChat:
    """A chat example as token ids: the model reads `prompt_ids` and writes `response_ids`."""

    prompt_ids: list[int]
    """The prompt through the chat template, ending with the generation prompt (e.g. "<|im_start|>assistant\\n")."""
    response_ids: list[int]
    """The response's content and the template's end of turn, at most max_response_tokens; [] without a response."""
    prompt_truncated: int
    """Tokens dropped from the left of a prompt longer than max_prompt_tokens."""
    response_truncated: int
    """Tokens dropped from the right of a response longer than max_response_tokens (its end of turn first)."""


# ------------------------------------------------------------------------------------------------------ reading

def _kind(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _check_unicode(value, where: str, name: str | None = None) -> None:
    """Every string in a row, keys and nested ones too, is valid Unicode: a JSON "\\ud800" escape decodes to a lone
    surrogate, which no tokenizer accepts; the message names where it is ('messages[1].content')."""
    if isinstance(value, str):
        if not value.isascii():
            encode_utf8(value, where if name is None else f"{where}: '{name}'", DataError)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not key.isascii():
                encode_utf8(key, f"{where}: a key" + ("" if name is None else f" of '{name}'"), DataError)
            _check_unicode(item, where, show(key) if name is None else f"{name}.{show(key)}")
    elif isinstance(value, list):
        for n, item in enumerate(value):
            _check_unicode(item, where, f"{name}[{n}]")


def _messages(value, where: str) -> tuple[tuple[dict, ...], str | None]:
    """(prompt, response) of an OpenAI-style message list."""
    if not isinstance(value, list):
        raise DataError(f"{where}: 'messages' must be a list of {{\"role\", \"content\"}} objects, got {_kind(value)}")
    messages = []
    for n, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{n}] must be an object {{\"role\": ..., \"content\": ...}}, got "
                            f"{_kind(m)}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: messages[{n}].role is {show(role)}; a role is one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{n}].content must be a string, got {_kind(content)}")
        if role == "system" and n > 0:
            raise DataError(f"{where}: messages[{n}] is a system message; only the first message may be one")
        messages.append({"role": role, "content": content})
    users = [n for n, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise DataError(f"{where}: the messages hold no user turn; a conversation needs one for the model to answer")
    last = users[-1]
    after = messages[last + 1:]
    if len(after) > 1:
        raise DataError(f"{where}: {len(after)} assistant messages after the last user turn; the response is one")
    return tuple(messages[: last + 1]), after[0]["content"] if after else None


def _example(row, path: Path, line: int) -> ChatExample:
    where = f"{path}: line {line}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: {_FORMAT}, got {_kind(row)}")
    _check_unicode(row, where)
    if "messages" in row and "prompt" in row:
        raise DataError(f"{where}: both 'messages' and 'prompt'; a row is one or the other")
    if "messages" in row:
        prompt, response = _messages(row["messages"], where)
        fields = {k: v for k, v in row.items() if k != "messages"}
    elif "prompt" in row:
        text, response = row["prompt"], row.get("completion")
        if not isinstance(text, str):
            raise DataError(f"{where}: 'prompt' must be a string, got {_kind(text)}")
        if response is not None and not isinstance(response, str):
            raise DataError(f"{where}: 'completion' must be a string, got {_kind(response)}")
        prompt = ({"role": "user", "content": text},)
        fields = {k: v for k, v in row.items() if k not in ("prompt", "completion")}
    else:
        raise DataError(f"{where}: neither 'messages' nor 'prompt'; {_FORMAT}")
    if response is not None and not response.strip():
        raise DataError(f"{where}: the response is empty; give one, or leave it out for the teacher to answer")
    return ChatExample(prompt, response, fields, f"{path}:{line}")


def read_chat_file(path: str | Path) -> list[ChatExample]:
    """The chat examples of a JSON Lines file, one row a line (any line ending; a BOM and blank lines skipped).
    A null or absent "completion" is a prompt without a response. Bad rows are a one-line `DataError` naming the
    file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = decode_utf8(path.read_bytes(), str(path), DataError)
    examples = [_example(_json(line, path, i), path, i)
                for i, line in enumerate(LINE_BREAK.split(text), 1) if line.strip()]
    if not examples:
        raise DataError(f"{path}: no rows; {_FORMAT}, one a line")
    return examples


# ----------------------------------------------------------------------------------------------------- encoding

def _sentinel(n: int) -> str:
    # Private-use characters: no template writes them, and filters such as `trim` leave them as they are.
    return f"\ue000kdistill-content-{n}\ue001"


def _specials(tokenizer) -> re.Pattern | None:
    """The strings that `split_special_tokens` splits (added tokens marked special), longest first, as the
    tokenizer matches them; None when it has none."""
    strings = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len,
                     reverse=True)
    return re.compile("|".join(map(re.escape, strings))) if strings else None


def _render(tokenizer, messages: list[dict], where: str, *, generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{tokenizer.name_or_path or 'the tokenizer'}: no chat template; the instruction task "
                        "needs an instruction-tuned model whose tokenizer has one")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except jinja2.TemplateError as e:  # a template's raise_exception, e.g. "roles must alternate user/assistant"
        raise DataError(f"{where}: the chat template refuses this conversation: {' '.join(str(e).split())}") from None


def text_ids(tokenizer, text: str) -> list[int]:
    """A message content's tokens: no special tokens added, a special token's string split into ordinary ones."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _prompt_ids(tokenizer, messages: list[dict], specials: re.Pattern | None, where: str) -> list[int]:
    """The prompt through the template with the generation prompt; every special token from the template."""
    rendered = _render(tokenizer, messages, where, generation_prompt=True)
    forged = [match.group() for m in messages if specials and (match := specials.search(m["content"]))]
    if not forged:
        # Exactly apply_chat_template(..., tokenize=True): the rendered text in one piece.
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    # A content holds a special token's string. Render with a sentinel in place of each content to find the
    # template's own text; cut that at its special tokens; each run of text between two special tokens (template
    # text and contents) is tokenised with split_special_tokens, so only the template's special tokens are special.
    marked = _render(tokenizer, [{**m, "content": _sentinel(n)} for n, m in enumerate(messages)], where,
                     generation_prompt=True)
    pieces = re.split("|".join(re.escape(_sentinel(n)) for n in range(len(messages))), marked)
    contents = [m["content"] for m in messages] + [""]
    if len(pieces) != len(contents) or "".join(p + c for p, c in zip(pieces, contents)) != rendered:
        raise DataError(f"{where}: a message holds the special token string {forged[0]!r} and the chat template "
                        "rewrites, reorders or drops message contents, so it cannot be kept as text; remove it")
    runs: list[str | int] = [""]  # text (str) and the template's special tokens (int id), in order
    for piece, content in zip(pieces, contents):
        start = 0
        for match in specials.finditer(piece):
            runs[-1] += piece[start: match.start()]
            runs += [tokenizer.convert_tokens_to_ids(match.group()), ""]
            start = match.end()
        runs[-1] += piece[start:] + content
    ids: list[int] = []
    for run in runs:
        if isinstance(run, int):
            ids.append(run)
        elif run:
            ids += text_ids(tokenizer, run)
    return ids


def _end_of_turn(tokenizer, messages: list[dict], specials: re.Pattern | None, where: str) -> list[int]:
    """What the template writes after an assistant message's content, up to and including its first special token
    (ChatML: "<|im_end|>"); EOS when it writes none, so that the student still learns to stop."""
    marked = _render(tokenizer, [*messages, {"role": "assistant", "content": _sentinel(0)}], where,
                     generation_prompt=False)
    after = marked.partition(_sentinel(0))[2]
    match = specials.search(after) if specials else None
    if match:
        return tokenizer(after[: match.end()], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is None:
        raise UserError(f"{tokenizer.name_or_path or 'the tokenizer'}: its chat template ends an assistant turn "
                        "with no special token and it has no EOS token, so a response could not end")
    return [tokenizer.eos_token_id]


def encode_chat(tokenizer, example: ChatExample, *, max_prompt_tokens: int, max_response_tokens: int,
                response: str | None = None) -> EncodedChat:
    """`example` through `tokenizer`'s chat template: its prompt with the generation prompt, and its response
    (`response`, e.g. a teacher's, else the example's own) as content + end of turn.

    A prompt longer than `max_prompt_tokens` loses tokens from the LEFT: the end of the conversation (the last user
    turn and the generation prompt, which the response follows) is what the response depends on most; the
    template's first tokens, such as a system header, may be lost. A response longer than `max_response_tokens`
    is cut on the right, its end of turn first.
    """
    if max_prompt_tokens < 1 or max_response_tokens < 1:
        raise ValueError(f"max_prompt_tokens and max_response_tokens must be >= 1, got {max_prompt_tokens} and "
                         f"{max_response_tokens}")
    specials = _specials(tokenizer)
    messages = list(example.prompt)
    prompt = _prompt_ids(tokenizer, messages, specials, example.where)
    cut = max(0, len(prompt) - max_prompt_tokens)
    response = example.response if response is None else response
    target = [] if response is None else \
        text_ids(tokenizer, response) + _end_of_turn(tokenizer, messages, specials, example.where)
    return EncodedChat(prompt[cut:], target[:max_response_tokens], cut, max(0, len(target) - max_response_tokens))


def with_shots(examples: list[ChatExample], shots: list[ChatExample]) -> list[ChatExample]:
    """The teacher's view of `examples` (teacher.shots): each prompt after the `shots` gold rows as earlier (user,
    assistant) turns, a system message kept first. The student answers without them: what it learns is the
    teacher's in-context behaviour (context distillation, Snell et al. 2022)."""
    if not shots:
        return examples
    turns = tuple(m for shot in shots for m in (*(t for t in shot.prompt if t["role"] != "system"),
                                                {"role": "assistant", "content": shot.response}))
    out = []
    for e in examples:
        system = tuple(e.prompt[:1]) if e.prompt[0]["role"] == "system" else ()
        out.append(replace(e, prompt=system + turns + tuple(e.prompt[len(system):])))
    return out
