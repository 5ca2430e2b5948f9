"""Any OpenAI-compatible chat endpoint (`vllm serve`, `transformers serve`, hosted APIs) over HTTP.

A message's content may be a list of OpenAI content parts, so vision-language servers get images
(:func:`image_part`: a base64 data URL in an `image_url` part).

Bounded concurrency (a thread pool of `max_concurrency` requests in flight), a per-request deadline
(total, not per read: a server trickling a byte at a time is cut off), a maximum response size, and
transport-level retries with backoff for connection errors, timeouts, 429 and 5xx. A response
that arrives but is malformed is not retried here: it comes back as finish_reason="error" and the
stage's parse-and-retry loop (`generate_checked`) decides.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from PIL import Image

from groundmill.stages.llm.base import (
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    Generation,
    LLMBackend,
    LLMUnavailable,
    Prompt,
    SamplingParams,
    as_messages,
)

# How a request that failed at the transport level every try is reported (a transient failure).
GAVE_UP = "gave up after"
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class _Retryable(Exception):
    pass


def image_part(image: Image.Image, quality: int = 90) -> dict[str, Any]:
    """An OpenAI `image_url` content part carrying the image inline as a base64 JPEG data URL."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url}}


def parse_chat_response(body: Any) -> Generation:
    """An OpenAI chat-completion JSON body -> Generation; malformed bodies raise ValueError."""
    try:
        choice = body["choices"][0]
        text = choice["message"]["content"]
        reason = choice.get("finish_reason")
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"malformed chat completion ({type(e).__name__}: {e})") from None
    if not isinstance(text, str):
        raise ValueError(f"malformed chat completion: content is {type(text).__name__}")
    usage = body.get("usage") or {}
    tokens = int(usage.get("completion_tokens") or 0)
    # Servers say "stop" for EOS and stop strings, "length" at max_tokens; anything else did not stop cleanly.
    finish = FINISH_STOP if reason == "stop" else FINISH_LENGTH
    return Generation(text, finish, tokens=tokens)


class OpenAIHTTPBackend(LLMBackend):
    name = "http"

    def setup(self) -> None:
        if not self.config.base_url:
            raise LLMUnavailable("the http LLM backend needs llm.base_url (e.g. http://127.0.0.1:8000/v1)")
        headers = {}
        key = os.environ.get(self.config.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(max_connections=self.config.max_concurrency)
        self.client = httpx.Client(
            base_url=self.config.base_url.rstrip("/"),
            headers=headers,
            timeout=self.config.timeout_s,
            limits=limits,
        )
        self.pool = ThreadPoolExecutor(max_workers=self.config.max_concurrency)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Generation]:
        return self.generate_each([(p, params) for p in prompts])

    def generate_each(self, jobs: list[tuple[Prompt, SamplingParams]]) -> list[Generation]:
        """Like `generate`, with each prompt's own sampling settings (a seed per sampled caption)."""
        return list(self.pool.map(lambda job: self._request(*job), jobs))

    def _payload(self, prompt: Prompt, params: SamplingParams) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model_id,
            "messages": as_messages(prompt),
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": False,
        }
        if params.stop:
            payload["stop"] = params.stop
        if params.seed is not None:
            payload["seed"] = params.seed
        return payload

    def _request(self, prompt: Prompt, params: SamplingParams) -> Generation:
        payload = self._payload(prompt, params)
        last = ""
        for attempt in range(self.config.request_retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
            try:
                return self._post(payload)
            except _Retryable as e:
                last = str(e)
            except ValueError as e:  # arrived but unusable: the caller's retry loop decides
                return Generation("", FINISH_ERROR, error=str(e))
        return Generation(
            "", FINISH_ERROR, error=f"{GAVE_UP} {self.config.request_retries + 1} tries: {last}"
        )

    def _post(self, payload: dict[str, Any]) -> Generation:
        deadline = time.monotonic() + self.config.timeout_s
        try:
            with self.client.stream("POST", "/chat/completions", json=payload) as response:
                if response.status_code in _RETRY_STATUS:
                    raise _Retryable(f"HTTP {response.status_code}")
                text = self._read_body(response, deadline)
        except httpx.TimeoutException as e:
            raise _Retryable(f"timeout after {self.config.timeout_s}s ({type(e).__name__})") from None
        except httpx.TransportError as e:
            raise _Retryable(f"{type(e).__name__}: {e}") from None
        if response.status_code != 200:
            raise ValueError(f"HTTP {response.status_code}: {text[:200]}")
        try:
            body = json.loads(text)
        except ValueError:
            raise ValueError(f"response is not JSON: {text[:120]!r}") from None
        return parse_chat_response(body)

    def _read_body(self, response: httpx.Response, deadline: float) -> str:
        """The response body, read within the request's deadline and up to max_response_bytes."""
        limit = self.config.max_response_bytes
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ValueError(f"response of {declared} bytes > llm.max_response_bytes {limit}")
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > limit:
                raise ValueError(f"response larger than llm.max_response_bytes {limit}")
            if time.monotonic() > deadline:
                raise _Retryable(f"timeout: the response took over {self.config.timeout_s}s in all")
            chunks.append(chunk)
        return b"".join(chunks).decode(response.encoding or "utf-8", errors="replace")
