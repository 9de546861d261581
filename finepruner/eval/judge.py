"""Optional LLM judge: an OpenAI-compatible ``/chat/completions`` client (stdlib ``urllib`` only).

Used by MM-Vet grading (spec ``eval_protocol.md`` section 12) and the MMBench matching fallback
(section 10). It is configured only when a judge model is named (``--judge-model`` or
``FINEPRUNER_JUDGE_MODEL``); the base URL comes from ``--judge-base-url``, ``FINEPRUNER_JUDGE_BASE_URL``,
``OPENAI_BASE_URL`` or ``https://api.openai.com/v1``; the key from ``FINEPRUNER_JUDGE_API_KEY`` or
``OPENAI_API_KEY``. Every reply is cached (JSONL) so a rerun does not pay twice, and the cache is saved
with the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from finepruner.eval.errors import EvalError

DEFAULT_BASE_URL = "https://api.openai.com/v1"


class JudgeError(EvalError):
    """The judge endpoint failed after all retries or replied with an unexpected body."""


@dataclass(frozen=True)
class JudgeConfig:
    """Where and how to call the judge."""

    model: str
    base_url: str = DEFAULT_BASE_URL
    api_key: str | None = None
    timeout_s: float = 120.0
    max_retries: int = 5
    retry_sleep_s: float = 30.0


class OpenAIJudge:
    """``complete(prompt, max_tokens=, temperature=)`` -> reply text, with a persistent cache."""

    def __init__(self, config: JudgeConfig, cache_path: Path | None = None) -> None:
        self.config = config
        self.cache_path = cache_path
        self._cache: dict[str, str] = {}
        if cache_path is not None and cache_path.is_file():
            for line in cache_path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self._cache[row["key"]] = row["reply"]

    @property
    def model(self) -> str:
        return self.config.model

    def _key(self, prompt: str, max_tokens: int, temperature: float, tag: str) -> str:
        blob = json.dumps([self.config.model, prompt, max_tokens, temperature, tag], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def complete(self, prompt: str, *, max_tokens: int, temperature: float = 0.0, tag: str = "") -> str:
        """One user message -> the assistant's reply; ``tag`` separates repeated runs in the cache."""
        key = self._key(prompt, max_tokens, temperature, tag)
        if key in self._cache:
            return self._cache[key]
        reply = self._post(prompt, max_tokens, temperature)
        self._cache[key] = reply
        if self.cache_path is not None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with self.cache_path.open("a", encoding="utf-8") as fh:
                fh.write(
                    json.dumps(
                        {
                            "key": key,
                            "model": self.config.model,
                            "temperature": temperature,
                            "tag": tag,
                            "prompt": prompt,
                            "reply": reply,
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
        return reply

    def _post(self, prompt: str, max_tokens: int, temperature: float) -> str:
        url = self.config.base_url.rstrip("/") + "/chat/completions"
        body = json.dumps(
            {
                "model": self.config.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": temperature,
            }
        ).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        last: Exception | None = None
        for attempt in range(self.config.max_retries):
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.config.timeout_s) as resp:
                    payload = json.loads(resp.read().decode("utf-8"))
                return str(payload["choices"][0]["message"]["content"] or "")
            except urllib.error.HTTPError as err:
                last = err
                if err.code not in (408, 409, 429) and err.code < 500:
                    raise JudgeError(f"judge {url} answered HTTP {err.code}: {err.read()[:200]!r}") from err
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                last = err
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as err:
                raise JudgeError(f"judge {url}: unexpected reply ({err})") from err
            if attempt + 1 < self.config.max_retries:
                time.sleep(self.config.retry_sleep_s)
        raise JudgeError(f"judge {url} failed after {self.config.max_retries} tries: {last}")


def judge_from_settings(
    model: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    cache_path: Path | None = None,
    retry_sleep_s: float | None = None,
) -> OpenAIJudge | None:
    """A judge from explicit settings, else the environment; ``None`` when no judge model is named."""
    model = model or os.environ.get("FINEPRUNER_JUDGE_MODEL")
    if not model:
        return None
    base_url = (
        base_url
        or os.environ.get("FINEPRUNER_JUDGE_BASE_URL")
        or os.environ.get("OPENAI_BASE_URL")
        or DEFAULT_BASE_URL
    )
    api_key = api_key or os.environ.get("FINEPRUNER_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    config = JudgeConfig(model=model, base_url=base_url, api_key=api_key)
    if retry_sleep_s is not None:
        config = JudgeConfig(model=model, base_url=base_url, api_key=api_key, retry_sleep_s=retry_sleep_s)
    return OpenAIJudge(config, cache_path=cache_path)
