"""OpenAI-compatible request parsing and response bodies, shaped as FastDeploy sends them.

Streaming is the hot path (one SSE event per token per stream), so token events are built by joining
pre-encoded byte fragments instead of serialising a dict per token.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

# Plain ASCII words: they need no JSON escaping, which keeps the byte templates valid.
_TEXT = (
    "the model said that load balancing across replicas keeps queues short and time to first token low "
    "while nginx counts connections and the sidecar adjusts weights from metrics every few seconds"
)
VOCAB = tuple(f" {w}" for w in _TEXT.split(" "))
VOCAB_BYTES = tuple(w.encode() for w in VOCAB)
DONE = b"data: [DONE]\n\n"


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def error_body(message: str, *, code: int, type_: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass(frozen=True)
class Parsed:
    chat: bool
    model: str
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool


def _text_len(content: Any, where: str) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if not isinstance(part, dict):
                raise BadRequest(f"{where} parts must be objects", where)
            text = part.get("text", "")
            total += len(text) if isinstance(text, str) else 0
        return total
    raise BadRequest(f"{where} must be a string or a list of content parts", where)


def _int_field(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"{name} must be a positive integer, got {value!r}", name)
    return value


def parse_request(raw: bytes, *, chat: bool, default_model: str, default_max_tokens: int) -> Parsed:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list", "messages")
        chars = 0
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                raise BadRequest(f"messages[{i}] must be an object with a string role", "messages")
            chars += _text_len(msg.get("content"), f"messages[{i}].content")
        prompt_tokens = max(1, chars // 4) + 3 * len(messages)  # the chat template adds a few tokens a turn
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompt_tokens = max(1, len(prompt) // 4)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompt_tokens = len(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, str) for t in prompt):
            prompt_tokens = max(1, sum(len(t) for t in prompt) // 4)
        else:
            raise BadRequest("prompt must be a string, a list of strings or a list of token ids", "prompt")
    max_tokens = _int_field(body, "max_completion_tokens") or _int_field(body, "max_tokens") or default_max_tokens
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    model = body.get("model") or default_model
    if not isinstance(model, str):
        raise BadRequest("model must be a string", "model")
    return Parsed(chat, model, prompt_tokens, max_tokens, stream, bool(options.get("include_usage")))


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Formatter:
    """Bodies for one request: SSE events when streaming, one JSON document otherwise."""

    def __init__(self, parsed: Parsed, rid: int, model: str, salt: int) -> None:
        self.parsed = parsed
        self.salt = salt
        self.created = int(time.time())
        if parsed.chat:
            self.id = f"chatcmpl-{rid:x}"
            self.object = "chat.completion.chunk"
        else:
            self.id = f"cmpl-{rid:x}"
            self.object = "text_completion"
        self.model = model
        head = json.dumps({"id": self.id, "object": self.object, "created": self.created, "model": model})[:-1]
        if parsed.chat:
            self._pre = f'data: {head}, "choices": [{{"index": 0, "delta": {{"content": "'.encode()
            self._post = b'"}, "logprobs": null, "finish_reason": null}]}\n\n'
        else:
            self._pre = f'data: {head}, "choices": [{{"index": 0, "text": "'.encode()
            self._post = b'", "logprobs": null, "finish_reason": null}]}\n\n'

    def word(self, i: int) -> bytes:
        return VOCAB_BYTES[(i + self.salt) % len(VOCAB_BYTES)]

    def _event(self, payload: dict) -> bytes:
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    def _chunk(self, choices: list, **extra: Any) -> dict:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def first_event(self) -> bytes:
        if not self.parsed.chat:
            return b""
        return self._event(
            self._chunk(
                [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
            )
        )

    def token_events(self, start: int, end: int) -> bytes:
        pre, post = self._pre, self._post
        return b"".join(pre + self.word(i) + post for i in range(start, end))

    def final_events(self, completion_tokens: int, finish_reason: str = "length") -> bytes:
        if self.parsed.chat:
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}
        out = self._event(self._chunk([choice]))
        if self.parsed.include_usage:
            out += self._event(self._chunk([], usage=usage(self.parsed.prompt_tokens, completion_tokens)))
        return out + DONE

    def full_body(self, completion_tokens: int, finish_reason: str = "length") -> dict:
        text = "".join(VOCAB[(i + self.salt) % len(VOCAB)] for i in range(completion_tokens))
        if self.parsed.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(self.parsed.prompt_tokens, completion_tokens),
        }
