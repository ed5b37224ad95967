"""Which request FastDeploy refuses, with which status and body: FastAPI + pydantic validation, then the handlers.

Mirrored from PaddlePaddle/FastDeploy (versions in tests/fixtures/upstream/README.md):

- fastdeploy/entrypoints/openai/protocol.py: ChatCompletionRequest / CompletionRequest fields, their order (the
  first failing field is the one reported) and the `validate_stream_options` model validator.
- fastdeploy/utils.py `ExceptionHandler`: a request that fails validation gets 400, `type`
  "invalid_request_error", `code` "missing_required_parameter" (param `messages`) or "invalid_value", `param` =
  the last element of the error's location; any other exception 500 with `type` "internal_error".
- fastdeploy/entrypoints/openai/api_server.py: every `ErrorResponse` a serving handler returns (bad `max_tokens`,
  `n` other than 1, empty `messages`) goes out as HTTP 500.
- fastdeploy/entrypoints/engine_client.py `valid_parameters`: the max_tokens and n checks.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from fdngx.sim.protocol import INTERNAL_ERROR, INVALID_REQUEST_ERROR, MAX_MODEL_LEN, Parsed, error_body

TRUE_STRINGS = frozenset({"1", "on", "t", "true", "y", "yes"})
FALSE_STRINGS = frozenset({"0", "off", "f", "false", "n", "no"})


class RequestError(Exception):
    """A request FastDeploy refuses before generating: HTTP status and body."""

    def __init__(self, status: int, body: dict) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body


def _invalid(param: str, message: str) -> RequestError:
    # utils.py ExceptionHandler.handle_request_validation_exception: param = the last element of the first
    # error's location; only `messages` gets missing_required_parameter.
    code = "missing_required_parameter" if param == "messages" else "invalid_value"
    return RequestError(400, error_body(message, INVALID_REQUEST_ERROR, param=param, code=code))


def _handler_crash(message: str) -> RequestError:
    """An exception outside the handlers: utils.py ExceptionHandler.handle_exception, 500 internal_error."""
    return RequestError(500, error_body(message, INTERNAL_ERROR))


def _int_location_crash(position: int) -> RequestError:
    # When the first validation error's location ends in an int (a JSON decode position, a list index),
    # handle_request_validation_exception builds ErrorInfo(param=<int>), which pydantic refuses (param is
    # Optional[str]); that exception reaches handle_exception: 500 internal_error (inferred from the source).
    return _handler_crash(
        "1 validation error for ErrorInfo\nparam\n  Input should be a valid string "
        f"[type=string_type, input_value={position}, input_type=int]"
    )


def _int(body: dict, name: str) -> int | None:
    """pydantic's lax int: ints, bools, whole floats and numeric strings pass."""
    value = body.get(name)
    if value is None or isinstance(value, int):
        return None if value is None else int(value)
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise _invalid(name, "Input should be a valid integer, got a number with a fractional part")
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise _invalid(name, "Input should be a valid integer, unable to parse string as an integer") from None
    raise _invalid(name, "Input should be a valid integer")


def _bool(body: dict, name: str, default: bool | None = None) -> bool | None:
    """pydantic's lax bool: bools, 0/1 and the usual yes/no strings pass."""
    value = body.get(name, default)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        if value.strip().lower() in TRUE_STRINGS:
            return True
        if value.strip().lower() in FALSE_STRINGS:
            return False
        raise _invalid(name, "Input should be a valid boolean, unable to interpret input")
    raise _invalid(name, "Input should be a valid boolean")


def _str(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise _invalid(name, "Input should be a valid string")
    return value


def _text_len(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def _request_id(body: dict, prefix: str) -> str:
    # serving_chat.py / serving_completion.py: request_id (prefixed), else "<prefix>-<user>-<uuid4>".
    given, user = _str(body, "request_id"), _str(body, "user")
    if given is not None:
        return given if given.startswith(f"{prefix}-") else f"{prefix}-{given}"
    if user is not None:
        return f"{prefix}-{user}-{uuid.uuid4()}"
    return f"{prefix}-{uuid.uuid4()}"


def _check_messages_field(body: dict) -> None:
    if "messages" not in body:
        raise _invalid("messages", "Field required")
    if not isinstance(body["messages"], list):
        raise _invalid("list[any]", "Input should be a valid list")  # first member of Union[List[Any], ...]


def _chat_prompt_tokens(messages: list, request_id: str) -> int:
    """Handler-level checks (after validation, so answered as an ErrorResponse: HTTP 500) and the count."""
    where = f"request[{request_id}] generator error"
    if not messages:
        # protocol.py ChatCompletionRequest.to_dict_for_infer asserts a non-empty list.
        msg = f"{where}: messages can not be an empty list, unless prompt_token_ids is passed"
        raise RequestError(500, error_body(msg, INVALID_REQUEST_ERROR))
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            # The chat template fails on it (this message text is the simulator's own).
            text = f"{where}: messages[{i}] must be an object with a string role"
            raise RequestError(500, error_body(text, INVALID_REQUEST_ERROR))
    chars = sum(_text_len(m.get("content")) for m in messages)
    return max(1, chars // 4) + 3 * len(messages)  # the chat template adds a few tokens a turn


def _completion_prompt_tokens(body: dict) -> int:
    """CompletionRequest.prompt: Union[List[int], List[List[int]], str, List[str]]."""
    if "prompt" not in body:
        raise _invalid("prompt", "Field required")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return max(1, len(prompt) // 4)
    if not isinstance(prompt, list):
        raise _invalid("list[int]", "Input should be a valid list")  # first member of the Union
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return max(1, len(prompt))
    if all(isinstance(t, str) for t in prompt):
        return max(1, sum(len(t) for t in prompt) // 4)
    if all(isinstance(t, list) and all(isinstance(x, int) for x in t) for t in prompt):
        return max(1, sum(len(t) for t in prompt))
    # The first error is the List[int] member's, located at the first non-int item: an int location.
    raise _int_location_crash(next(i for i, t in enumerate(prompt) if not isinstance(t, int) or isinstance(t, bool)))


def parse_request(raw: bytes, *, chat: bool, default_max_tokens: int, max_model_len: int = MAX_MODEL_LEN) -> Parsed:
    """Check a request as FastAPI + pydantic + FastDeploy's handlers do; raise RequestError as they answer."""
    if not raw.strip():
        raise _invalid("body", "Field required")
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        # FastAPI turns a non-JSON-decode body error into HTTPException(400), answered {"detail": ...}.
        raise RequestError(400, {"detail": "There was an error parsing the body"}) from None
    except json.JSONDecodeError as exc:
        # FastAPI's json_invalid error has location ("body", <position>).
        raise _int_location_crash(exc.pos) from None
    if body is None:
        raise _invalid("body", "Field required")
    if not isinstance(body, dict):
        # protocol.py's validate_stream_options (mode="before") calls data.get() on whatever came.
        raise _handler_crash(f"'{type(body).__name__}' object has no attribute 'get'")
    if body.get("stream_options") and not body.get("stream"):
        raise _invalid("body", "Value error, Stream options can only be defined when `stream=True`.")
    # Field checks in the models' field order (pydantic reports the first failing field).
    if chat:
        _check_messages_field(body)
        _str(body, "model")
        prompt_tokens = 0
    else:
        _str(body, "model")
        prompt_tokens = _completion_prompt_tokens(body)
    max_tokens = _int(body, "max_tokens")
    max_completion_tokens = _int(body, "max_completion_tokens") if chat else None
    n = _int(body, "n")
    stream = bool(_bool(body, "stream", False))
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _invalid("stream_options", "Input should be a valid dictionary or instance of StreamOptions")
    # StreamOptions.include_usage defaults to True: "stream_options": {} asks for usage.
    include_usage = options is not None and bool(_bool(options, "include_usage", True))
    request_id = _request_id(body, "chatcmpl" if chat else "cmpl")
    if chat:
        prompt_tokens = _chat_prompt_tokens(body["messages"], request_id)
    # engine_client.py valid_parameters: a ParameterError, returned as an ErrorResponse (HTTP 500).
    cap = max_completion_tokens or max_tokens
    if n is not None and n != 1:
        raise _parameter_error(chat, "n", "n only support 1.")
    if cap is not None and not 1 <= cap < max_model_len:
        raise _parameter_error(chat, "max_tokens", f"max_tokens can be defined [1, {max_model_len}).")
    return Parsed(
        chat=chat,
        request_id=request_id,
        prompt_tokens=prompt_tokens,
        max_tokens=cap or default_max_tokens,
        capped=cap is not None,
        stream=stream,
        include_usage=include_usage,
    )


def _parameter_error(chat: bool, param: str, message: str) -> RequestError:
    if chat:  # serving_chat.py create_chat_completion, `except ParameterError`
        return RequestError(500, error_body(message, INVALID_REQUEST_ERROR, param=param))
    # serving_completion.py create_completion, `except ParameterError`: its own type and a code of "400"
    return RequestError(500, error_body(message, "invalid_request", param=param, code="400"))
