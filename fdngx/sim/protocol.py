"""OpenAI-compatible response bodies, shaped byte for byte as FastDeploy sends them.

Mirrored from PaddlePaddle/FastDeploy (the versions read are listed in tests/fixtures/upstream/README.md):

- fastdeploy/entrypoints/openai/protocol.py: every body's fields and their order (pydantic dumps fields in
  definition order; streamed chunks use `model_dump_json(exclude_unset=True)`, full answers `model_dump()`);
  `ErrorInfo(message, type, param, code)` with a string `code`; `ModelInfo`/`ModelPermission`.
- fastdeploy/entrypoints/openai/api_server.py: 429 is `{"detail": ...}`; bodies are starlette
  `JSONResponse`s (compact JSON). Which request gets which error: validation.py.
- serving_chat.py `chat_completion_stream_generator` / serving_completion.py `completion_stream_generator`:
  the chunk sequence (see `Formatter`).

Streaming is the hot path (one SSE event per token per stream), so token events are joined from pre-encoded
byte fragments instead of serialising a dict per token.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Parsed:
    chat: bool
    request_id: str
    prompt_tokens: int
    max_tokens: int  # tokens this request generates
    capped: bool  # the client set max_tokens: the answer ends at the cap ("length"), else at EOS ("stop")
    stream: bool
    include_usage: bool


# Plain ASCII words: they need no JSON escaping beyond the quotes.
_TEXT = (
    "the model said that load balancing across replicas keeps queues short and time to first token low "
    "while nginx counts connections and the sidecar adjusts weights from metrics every few seconds"
)
VOCAB = tuple(f" {w}" for w in _TEXT.split(" "))
VOCAB_JSON = tuple(json.dumps(w).encode() for w in VOCAB)
DONE = b"data: [DONE]\n\n"
MAX_MODEL_LEN = 8192
INTERNAL_ERROR = "internal_error"
INVALID_REQUEST_ERROR = "invalid_request_error"


def dumps(obj: Any) -> bytes:
    """JSON as starlette's JSONResponse writes it (compact, UTF-8)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> dict:
    """FastDeploy's ErrorResponse (protocol.py): ErrorInfo fields in their definition order."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def too_many_requests_body(max_concurrency: int) -> dict:
    """api_server.py `connection_manager`: HTTPException(429, detail=...) answered as {"detail": ...}.

    N is the instance's `--max-concurrency` (the whole instance's, not one worker's share)."""
    return {"detail": f"Too many requests,current max concurrency is {max_concurrency}"}


def usage(prompt: int, completion: int, *, full: bool, chat: bool) -> dict[str, Any]:
    """protocol.py UsageInfo. Streamed (exclude_unset) it carries only the details the handler set."""
    if not full:
        prompt_details: dict[str, Any] = {"cached_tokens": 0}
    elif chat:
        prompt_details = {"cached_tokens": 0, "image_tokens": 0, "video_tokens": 0}
    else:
        prompt_details = {"cached_tokens": 0, "image_tokens": None, "video_tokens": None}
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": prompt_details,
        "completion_tokens_details": {"reasoning_tokens": 0, "image_tokens": 0},
    }


def models_body(name: str, max_model_len: int = MAX_MODEL_LEN) -> dict:
    """serving_models.py list_models: ModelList of ModelInfo(owned_by "FastDeploy", one ModelPermission)."""
    now = int(time.time())
    permission = {
        "id": f"modelperm-{uuid.uuid4().hex}",
        "object": "model_permission",
        "created": now,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    card = {
        "id": name,
        "object": "model",
        "created": now,
        "owned_by": "FastDeploy",
        "root": name,
        "parent": None,
        "max_model_len": max_model_len,
        "permission": [permission],
    }
    return {"object": "list", "data": [card]}


class Formatter:
    """The bodies of one request: SSE events when streaming, one JSON document otherwise.

    Chat stream (serving_chat.py): a first chunk whose delta carries role "assistant", content "" and
    reasoning_content "" (FastDeploy writes it with a space before the blank line), then one chunk per token;
    `finish_reason` rides on the last token's chunk ("length" at the client's max_tokens, else "stop", whose
    token is the EOS and decodes to ""); a usage chunk when stream_options asks; `data: [DONE]`.
    Completion stream (serving_completion.py): no first chunk, no "object" key in chunks, same ending.
    """

    def __init__(self, parsed: Parsed, model: str, salt: int) -> None:
        self.parsed = parsed
        self.salt = salt
        self.id = parsed.request_id
        self.model = model
        self.created = int(time.time())
        self.finish_reason = "length" if parsed.capped else "stop"
        ident = f'"id":{json.dumps(self.id, ensure_ascii=False)}'
        model_json = json.dumps(model, ensure_ascii=False)
        if parsed.chat:
            self.object = "chat.completion.chunk"
            head = f'data: {{{ident},"object":"{self.object}","created":{self.created},"model":{model_json},'
            self._pre = (head + '"choices":[{"index":0,"delta":{"content":').encode()
            self._mid = (
                b',"prompt_token_ids":null,"completion_token_ids":null,"reasoning_content":"","tool_calls":null},'
                b'"logprobs":null,"draft_logprobs":null,'
            )
        else:
            self.object = "text_completion"
            head = f'data: {{{ident},"created":{self.created},"model":{model_json},'
            self._pre = (head + '"choices":[{"index":0,"text":').encode()

    def word(self, i: int) -> bytes:
        return VOCAB_JSON[(i + self.salt) % len(VOCAB_JSON)]

    def _token(self, i: int, arrival: bytes, last: bool) -> bytes:
        word = b'""' if last and not self.parsed.capped else self.word(i)
        finish = f'"finish_reason":"{self.finish_reason}",'.encode() if last else b""
        if self.parsed.chat:
            return self._pre + word + self._mid + finish + b'"arrival_time":' + arrival + b"}]}\n\n"
        return (
            self._pre + word + b',"arrival_time":' + arrival + b',"logprobs":null,"draft_logprobs":null,'
            b'"prompt_token_ids":null,"completion_token_ids":null,"completion_tokens":null,"reasoning_content":""'
            + (b"," + finish[:-1] if last else b"")
            + b',"tool_calls":null}]}\n\n'
        )

    def first_event(self) -> bytes:
        if not self.parsed.chat:
            return b""
        delta = {
            "role": "assistant",
            "content": "",
            "prompt_token_ids": None,
            "completion_token_ids": None,
            "reasoning_content": "",
            "tool_calls": None,
        }
        return b"data: " + dumps(self._chunk([{"index": 0, "delta": delta}])) + b" \n\n"

    def token_events(self, start: int, end: int, arrival: float, finished: bool) -> bytes:
        """Tokens start..end-1; `arrival` is seconds since the request entered the batch, as FastDeploy's
        `arrival_time`; the last one carries finish_reason when `finished`."""
        stamp = repr(float(arrival)).encode()
        return b"".join(self._token(i, stamp, finished and i == end - 1) for i in range(start, end))

    def _chunk(self, choices: list, **extra: Any) -> dict:
        head: dict[str, Any] = {"id": self.id}
        if self.parsed.chat:  # the completion handler never sets `object` on its stream chunks
            head["object"] = self.object
        return {**head, "created": self.created, "model": self.model, "choices": choices, **extra}

    def final_events(self, completion_tokens: int) -> bytes:
        """After the last token chunk: the usage chunk if asked, then [DONE]."""
        out = b""
        if self.parsed.include_usage:
            body = usage(self.parsed.prompt_tokens, completion_tokens, full=False, chat=self.parsed.chat)
            out = b"data: " + dumps(self._chunk([], usage=body)) + b"\n\n"
        return out + DONE

    def text(self, completion_tokens: int) -> str:
        words = completion_tokens if self.parsed.capped else completion_tokens - 1  # the EOS has no text
        return "".join(VOCAB[(i + self.salt) % len(VOCAB)] for i in range(max(0, words)))

    def full_body(self, completion_tokens: int) -> dict:
        """serving_chat.py chat_completion_full_generator / serving_completion.py, dumped with every field."""
        text = self.text(completion_tokens)
        if self.parsed.chat:
            message = {
                "role": "assistant",
                "content": text,
                "multimodal_content": None,
                "reasoning_content": None,
                "tool_calls": None,
                "prompt_token_ids": None,
                "completion_token_ids": None,
                "prompt_tokens": None,
                "completion_tokens": None,
            }
            choice: dict[str, Any] = {
                "index": 0,
                "message": message,
                "logprobs": None,
                "draft_logprobs": None,
                "finish_reason": self.finish_reason,
            }
            obj = "chat.completion"
        else:
            choice = {
                "index": 0,
                "text": text,
                "prompt_token_ids": None,
                "completion_token_ids": None,
                "prompt_tokens": None,
                "completion_tokens": None,
                "arrival_time": None,
                "logprobs": None,
                "draft_logprobs": None,
                "reasoning_content": None,
                "finish_reason": self.finish_reason,
                "tool_calls": None,
            }
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(self.parsed.prompt_tokens, completion_tokens, full=True, chat=self.parsed.chat),
        }
