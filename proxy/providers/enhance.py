"""Prompt enhancement for local routes: the `prompt_enhancement` provider option of the diffusers kind.

Two ways to rewrite a prompt before the engine makes the images:

    prompt_enhancement: {with: text_encoder, max_new_tokens: 256, timeout: 20, default: off}
        the pipeline's own text encoder (Qwen2.5-VL) writes the rewrite, on the engine's worker thread
        (local_backend.enhance): no extra weights, no network.
    prompt_enhancement: {with: chat, base_url: https://host/v1, api_key: ${KEY}, model: NAME,
                         max_new_tokens: 256, timeout: 20, default: off, temperature: 0.2,
                         token_param: auto}
        an OpenAI-compatible chat-completions upstream (POST {base_url}/chat/completions), here, on the
        proxy's own HTTP session, before the engine is called.

The token bound's name: most OpenAI-compatible servers (vLLM, DashScope, older OpenAI models) take
`max_tokens`; OpenAI's newer models refuse it with a 400 and want `max_completion_tokens`, which
other servers may not know. `token_param: auto` (the default) sends `max_tokens`, and when the upstream
answers 400 naming that parameter it asks once more with the other name and keeps that name for the
route's later rewrites; `max_tokens` or `max_completion_tokens` sends that name only.

Both take `instruction` (the system prompt; default: local_backend.enhance's for the route's task).
A request's `prompt_enhancement: "on" | "off"` turns it on or off; a request that does not say gets
`default`. A route without the option ignores the field (it is a hint, as for upstreams without a
rewriter). A rewrite that fails (an upstream error, a bad answer, the timeout) is not an error: the
image is made from the prompt as given and `revised_prompt` is that prompt; the reason is logged
without the prompt, the answer's text or the key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from local_backend.config import PromptEnhancement
from local_backend.enhance import clean, instruction_for

from ..errors import Scrubber
from ..http.cpu import run_cpu

log = logging.getLogger("proxy.enhance")  # its name before proxy/ had packages: logging configs keep working

WAYS = ("text_encoder", "chat")
_COMMON = {"with", "max_new_tokens", "timeout", "default", "instruction"}
_CHAT = {"base_url", "api_key", "model", "temperature", "token_param"}
TOKEN_PARAMS = ("auto", "max_tokens", "max_completion_tokens")
MAX_ANSWER_BYTES = 1 << 20  # a chat answer larger than this is not a prompt
_TRUE, _FALSE = {"on", "true", "yes", "1"}, {"off", "false", "no", "0", ""}


@dataclass(frozen=True)
class EnhanceOptions:
    with_: str = "text_encoder"
    max_new_tokens: int = 256
    timeout: float = 20.0
    default: bool = False
    instruction: str | None = None
    base_url: str | None = None  # chat only
    api_key: str | None = None
    model: str | None = None
    temperature: float | None = None
    token_param: str = "auto"  # the name of the token bound: auto | max_tokens | max_completion_tokens


def parse_options(value: Any) -> EnhanceOptions | None:
    """The prompt_enhancement option (a mapping, or None) -> EnhanceOptions; ValueError says what is wrong."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("prompt_enhancement must be a mapping, e.g. {with: text_encoder}")
    way = value.get("with", "text_encoder")
    if way not in WAYS:
        raise ValueError(f"prompt_enhancement.with must be one of {', '.join(WAYS)}, not {way!r}")
    allowed = _COMMON | (_CHAT if way == "chat" else set())
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise ValueError(f"prompt_enhancement: unknown option(s) {', '.join(unknown)} for with: {way}; "
                         f"known: {', '.join(sorted(allowed))}")
    options = EnhanceOptions(
        with_=way,
        max_new_tokens=_number(value, "max_new_tokens", int, 256, 1, 4096),
        timeout=_number(value, "timeout", float, 20.0, 0.0, None),
        default=_flag(value.get("default", False)),
        instruction=_text(value, "instruction"),
        base_url=_text(value, "base_url"),
        api_key=_text(value, "api_key", empty_ok=True) or None,
        model=_text(value, "model"),
        temperature=_number(value, "temperature", float, None, 0.0, 2.0, inclusive=True),
        token_param=value.get("token_param", "auto"),
    )
    if options.token_param not in TOKEN_PARAMS:
        raise ValueError(f"prompt_enhancement.token_param must be one of {', '.join(TOKEN_PARAMS)}, "
                         f"not {options.token_param!r}")
    if way == "chat":
        for name in ("base_url", "model"):
            if not getattr(options, name):
                raise ValueError(f"prompt_enhancement.{name} is required with: chat")
        if not (options.base_url or "").startswith(("http://", "https://")):
            raise ValueError("prompt_enhancement.base_url must be an http(s) URL, e.g. https://host/v1")
    return options


def engine_spec(options: EnhanceOptions | None) -> PromptEnhancement | None:
    """The local_backend.PromptEnhancement for `with: text_encoder`; None otherwise."""
    if options is None or options.with_ != "text_encoder":
        return None

    return PromptEnhancement(max_new_tokens=options.max_new_tokens, timeout=options.timeout,
                             instruction=options.instruction, default=options.default)


def requested(value: str | None) -> bool | None:
    """A request's prompt_enhancement ("on" | "off" | None) -> rewrite or not (None: the route's default)."""
    return None if value is None else value == "on"


def chat_body(options: EnhanceOptions, instruction: str, prompt: str, token_param: str | None = None) -> dict:
    """The POST /v1/chat/completions body for a rewrite (pure). `token_param`: the token bound's name
    (default: the option's, max_tokens for auto)."""
    name = token_param or (options.token_param if options.token_param != "auto" else "max_tokens")
    body: dict[str, Any] = {
        "model": options.model,
        "messages": [{"role": "system", "content": instruction},
                     {"role": "user", "content": f"Rewrite this:\n\n{prompt}"}],
        name: options.max_new_tokens,
        "stream": False,
    }
    if options.temperature is not None:
        body["temperature"] = options.temperature
    return body


def chat_answer(payload: Any) -> tuple[str | None, str]:
    """A chat completion -> (its text or None, why not). choices[0].message.content, a string or parts."""
    try:
        choice = payload["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None, "the answer has no choices[0].message.content"
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    if not isinstance(content, str):
        return None, "the answer's content is not text"
    return content, str(choice.get("finish_reason") or "stop")


class ChatEnhancer:
    """Rewrites prompts with a chat-completions upstream. rewrite() never raises (except cancellation)."""

    def __init__(self, options: EnhanceOptions, provider: str, task: str = "generate") -> None:
        self.options = options
        self.provider = provider
        self.instruction = options.instruction or instruction_for(task)
        self.url = (options.base_url or "").rstrip("/") + "/chat/completions"  # parse_options: set with chat
        self.scrub = Scrubber([options.api_key] if options.api_key else []).text
        # the token bound's name now: token_param's, or (auto) max_tokens until the upstream refuses it
        self.token_param = "max_tokens" if options.token_param == "auto" else options.token_param
        self._running: dict[str, list] = {}  # prompt -> [its rewrite's task, callers waiting for it]

    def enabled(self, asked: bool | None) -> bool:
        return self.options.default if asked is None else asked

    async def rewrite(self, http: aiohttp.ClientSession, prompt: str) -> str | None:
        """The rewritten prompt, or None (logged) to keep the prompt as given.

        Calls for a prompt whose rewrite is under way wait for that one: the router splits a request of
        n images above the route's max_images_per_call into parallel calls, which start together, so
        every image of the request is made from the same rewrite (one upstream call, not one per part).
        The rewrite stops when the last caller waiting for it is cancelled."""
        entry = self._running.get(prompt)
        if entry is None:
            task = asyncio.ensure_future(self._rewrite(http, prompt))
            entry = self._running[prompt] = [task, 0]
            task.add_done_callback(lambda _: self._forget(prompt, entry))
        entry[1] += 1
        try:
            return await asyncio.shield(entry[0])
        finally:
            entry[1] -= 1
            if entry[1] == 0 and not entry[0].done():
                entry[0].cancel()

    def _forget(self, prompt: str, entry: list) -> None:
        if self._running.get(prompt) is entry:
            del self._running[prompt]

    async def _rewrite(self, http: aiohttp.ClientSession, prompt: str) -> str | None:
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.options.timeout):
                text, why = await self._ask(http, prompt)
        except TimeoutError:
            text, why = None, f"no answer in {self.options.timeout:g} s"
        except aiohttp.ClientError as e:
            text, why = None, f"{type(e).__name__}"
        except ValueError as e:  # not JSON
            text, why = None, f"the answer is not JSON ({type(e).__name__})"
        seconds = time.monotonic() - started
        if text is not None:
            text = clean(text)
            if not text:
                why = "the answer is empty"
        if not text:
            log.warning("provider %s: prompt not rewritten (%s, %.2f s): using the prompt as given",
                        self.provider, self.scrub(why), seconds)
            return None
        log.info("provider %s: prompt rewritten by %s in %.2f s (%s)", self.provider, self.options.model,
                 seconds, why)
        return text

    async def _ask(self, http: aiohttp.ClientSession, prompt: str) -> tuple[str | None, str]:
        headers = {"Accept": "application/json"}
        if self.options.api_key:
            headers["Authorization"] = f"Bearer {self.options.api_key}"
        name = self.token_param
        status, raw = await self._post(http, chat_body(self.options, self.instruction, prompt, name), headers)
        if status == 400 and self.options.token_param == "auto" and _refuses(raw, name):
            # e.g. OpenAI's newer models: "Unsupported parameter: 'max_tokens' ... Use 'max_completion_tokens'"
            other = "max_completion_tokens" if name == "max_tokens" else "max_tokens"
            status, raw = await self._post(http, chat_body(self.options, self.instruction, prompt, other), headers)
            if status == 200 and self.token_param == name:
                self.token_param = other  # for the route's later rewrites too
                log.info("provider %s: the chat upstream refuses %s; sending %s from now on",
                         self.provider, name, other)
        if raw is None:
            return None, f"HTTP {status}: the answer is larger than {MAX_ANSWER_BYTES} bytes"
        if status != 200:
            return None, f"HTTP {status}{_error_message(raw)}"
        return chat_answer(await run_cpu(len(raw), json.loads, raw))  # up to 1 MB: off the loop when big

    async def _post(self, http: aiohttp.ClientSession, body: dict, headers: dict) -> tuple[int, bytes | None]:
        """(status, the answer's bytes, or None when larger than MAX_ANSWER_BYTES)."""
        async with http.post(self.url, json=body, headers=headers, allow_redirects=False) as resp:
            raw = bytearray()
            async for chunk in resp.content.iter_chunked(65536):
                raw += chunk
                if len(raw) > MAX_ANSWER_BYTES:
                    return resp.status, None
            return resp.status, bytes(raw)


def _refuses(raw: bytes | None, name: str) -> bool:
    """Whether an OpenAI error body refuses the parameter `name` (its `param`, or named in its message)."""
    if raw is None:  # no body, or one over the size limit
        return False
    try:
        error = json.loads(raw)["error"]
    except (TypeError, ValueError, KeyError):
        return False
    if not isinstance(error, dict):
        return False
    return error.get("param") == name or name in str(error.get("message") or "")


def _error_message(raw: bytes) -> str:
    """': <message>' from an OpenAI error body (the caller scrubs it), else ''."""
    try:
        message = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return ""
    return f": {' '.join(str(message).split())[:200]}" if message else ""


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"prompt_enhancement.default must be on or off, not {value!r}")


def _number(value: dict, name: str, kind: type[int] | type[float], default: float | None, low: float,
            high: float | None, inclusive: bool = False) -> Any:
    raw = value.get(name, default)
    if raw is None or raw is default:
        return default
    try:
        if isinstance(raw, bool):
            raise ValueError
        number = kind(raw)
        if kind is int and isinstance(raw, float) and raw != number:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"prompt_enhancement.{name} must be a number, not {raw!r}") from None
    too_low = number < low if inclusive or kind is int else number <= low
    if too_low or (high is not None and number > high):
        bound = f"from {low} to {high}" if high is not None else f"> {low}"
        raise ValueError(f"prompt_enhancement.{name} must be {bound}, not {raw!r}")
    return number


def _text(value: dict, name: str, empty_ok: bool = False) -> str | None:
    raw = value.get(name)
    if raw is None:
        return None
    if not isinstance(raw, str) or (not raw.strip() and not empty_ok):
        raise ValueError(f"prompt_enhancement.{name} must be a non-empty string")
    return raw
