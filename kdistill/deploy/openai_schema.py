"""The OpenAI-compatible API's request bodies and errors (kdistill.deploy.openai_api serves them): the pydantic
models of /v1/completions and /v1/chat/completions (strict types, an unknown parameter refused), their JSON schema
for the OpenAPI document, and OpenAI's error JSON, {"error": {"message", "type", "param", "code"}}, with a
validation error turned into a 400 naming the parameter at fault.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import HTTPException
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

MAX_STOPS = 4
"""Stop strings per request, as OpenAI allows."""

# ------------------------------------------------------------------------------------------------ request bodies


class _Body(BaseModel):
    # strict: "1" is not a number and true not an integer; extra: an unknown parameter is refused, never ignored
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool | None = None
    """Send a last chunk holding the usage (its choices empty)."""


StopStrings = Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                              Field(max_length=MAX_STOPS)]


TokenIds = Annotated[list[int], Field(min_length=1)]


def _prompt_form(value: Any) -> str | None:
    # which form a prompt is, read from its first element, so that a bad one gets the errors of that form alone
    # ("prompt[1]: Input should be a valid integer"), not one for each form it is not
    if isinstance(value, str):
        return "string"
    if not isinstance(value, list):
        return None
    first = value[0] if value else None
    return "strings" if isinstance(first, str) else "id_lists" if isinstance(first, list) else "ids"


Prompt = Annotated[Annotated[str, Tag("string")] | Annotated[list[str], Field(min_length=1), Tag("strings")]
                   | Annotated[TokenIds, Tag("ids")] | Annotated[list[TokenIds], Field(min_length=1), Tag("id_lists")],
                   Discriminator(_prompt_form, custom_error_type="prompt_form",
                                 custom_error_message="Input should be a string, a list of strings, a list of token ids "
                                 "(integers) or a list of lists of token ids")]


class Sampling(_Body):
    model: str | None = None
    """The served model's name (GET /v1/models); another name is a 404. Left out: the served model."""
    max_tokens: int | None = Field(None, ge=0)
    """Tokens to generate at most (the server's max_tokens option caps it); left out: the server's
    default_max_tokens, or what the context leaves."""
    temperature: float | None = Field(None, ge=0, le=2)
    """0: greedy; above 0: sampled from softmax(logits / temperature). Default 1."""
    top_p: float | None = Field(None, gt=0, le=1)
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches top_p. Default 1."""
    n: int | None = Field(None, ge=1)
    """Choices per prompt. Default 1."""
    stop: StopStrings | None = None
    """Up to 4 strings; a choice ends before the first of them, which is not returned."""
    seed: int | None = None
    """Sampling with the same seed repeats its draws."""
    stream: bool | None = None
    """Answer with Server-Sent Events as the text is generated."""
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    """Only 0: not supported."""
    presence_penalty: float | None = None
    """Only 0: not supported."""
    logit_bias: dict[str, float] | None = None
    """Only empty: not supported."""
    user: str | None = None
    """Accepted and not used."""


class CompletionRequest(Sampling):
    """Body of POST /v1/completions."""

    prompt: Prompt
    """A string is one prompt, a list of strings several: choice i * n + j is prompt i's j-th. A list of integers is
    one prompt as token ids, a list of such lists several: read exactly as given (not tokenised, no special tokens or
    BOS added), each id in [0, the model's vocabulary size)."""
    logprobs: int | None = Field(None, ge=0, le=5)
    """Log-probabilities of the chosen tokens and of the k most likely at each position."""
    echo: bool | None = None
    """Return the prompt before the completion (with logprobs, its tokens' log-probabilities too); max_tokens 0
    then scores the prompt alone."""


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    """Text, or text parts (joined with line breaks)."""
    name: str | None = None
    """Accepted and not used (the chat template knows no names)."""


class ChatCompletionRequest(Sampling):
    """Body of POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """OpenAI's newer name for max_tokens; give one of the two."""
    logprobs: bool | None = None
    """Log-probabilities of the chosen tokens (choices[].logprobs.content)."""
    top_logprobs: int | None = Field(None, ge=0, le=20)
    """And of the k most likely tokens at each position; needs logprobs: true."""


_FIELDS = {name for m in (CompletionRequest, ChatCompletionRequest, ChatMessage, TextPart, StreamOptions)
           for name in m.model_fields}


def _inline_refs(schema: dict) -> dict:
    """The model's JSON schema with its $defs written in place: an OpenAPI document resolves "#/$defs/..." from its
    own root, where they are not (no request model refers to itself, so this ends)."""
    defs = schema.pop("$defs", {})

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def openapi_body(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": _inline_refs(model.model_json_schema())}}}}


# ------------------------------------------------------------------------------------------------------- errors


class APIError(HTTPException):
    """An HTTP error with OpenAI's `param` (the parameter at fault) and `code`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(status, message, headers=headers)
        self.param = param
        self.code = code


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_response(exc: StarletteHTTPException) -> Response:
    body = {"error": {"message": str(exc.detail), "type": _error_type(exc.status_code),
                      "param": getattr(exc, "param", None),
                      "code": getattr(exc, "code", None) or ("invalid_api_key" if exc.status_code == 401 else None)}}
    # ASCII JSON: a message quoting a request's lone surrogate ("\ud800") must still encode
    return Response(json.dumps(body), status_code=exc.status_code, headers=exc.headers, media_type="application/json")


def _path(loc: tuple) -> list:
    # the union members or tags that pydantic adds to a location ('str', 'ids') are not where the value is
    return [part for part in loc if isinstance(part, int) or part in _FIELDS]


def _param(loc: tuple) -> str:
    """A validation error's location as OpenAI writes a parameter: 'messages[0].content'."""
    out = ""
    for part in _path(loc):
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def parse_request(model: type[BaseModel], payload: Any) -> Any:
    """The request model of `payload`, or a 400 naming the first parameter at fault."""
    if not isinstance(payload, dict):
        raise APIError(400, "the body must be a JSON object")
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        errors = e.errors()
    depth = max(len(_path(err["loc"])) for err in errors)
    deepest = [err for err in errors if len(_path(err["loc"])) == depth]
    # a value that fits no member of a union fails each member's type check (prompt: 5); a constraint (too
    # many stop strings) says more than the other member's type error
    specific = [err for err in deepest if not err["type"].endswith("_type")]
    first = (specific or deepest)[0]
    param = _param(first["loc"])
    if first["type"] == "extra_forbidden":
        unknown = first["loc"][-1]
        where = _param(first["loc"][:-1])
        raise APIError(400, f"unsupported parameter {unknown!r}" + (f" in {where}" if where else "")
                       + " (see GET /docs for what this server takes)", param=where or None)
    if first["type"] == "missing":
        raise APIError(400, f"{param}: required", param=param)
    wanted = list(dict.fromkeys(err["msg"].removeprefix("Input should be ") for err in deepest))
    message = "Input should be " + " or ".join(wanted) if not specific and len(wanted) > 1 else first["msg"]
    raise APIError(400, f"{param}: {message}" if param else message, param=param or None)
