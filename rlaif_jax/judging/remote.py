"""A judge served elsewhere (`judge.mode = "remote"`): an HTTP endpoint instead of a local model, called on the
host between the step's compiled programs (the host path of `train_step.make_host_judge_step`), standard library
only (urllib, a thread pool).

Two APIs (`judge.remote_api`):
  openai      an OpenAI-compatible chat-completions server (vLLM, SGLang, TGI, a hosted API): one request per
              response, the template rendered as the user message, temperature 0. The score is read like the
              pointwise mode's: from the log-probabilities of the score tokens "1".."K" among the first answer
              token's `top_logprobs` when the server returns them, E = sum_k k P(k) (P renormalised over the K),
              score = 2 (E - 1) / (K - 1) - 1; else from the first integer 1..K in the answer text, the same
              rescaling of that k.
  reward_api  a plain JSON reward API (OpenRLHF's remote reward model): POST {"prompts": [...], "responses": [...]}
              of up to `judge.remote_batch_size` pairs, answer {"rewards": [...]} (or {"scores": [...]}, or a bare
              list), one finite number per pair, used as the score as it is.

Reliability: at most `judge.remote_concurrency` requests in flight; each attempt has `judge.remote_timeout_s`;
a failed attempt (connection error, timeout, HTTP error, an answer that does not parse) is retried up to
`judge.remote_retries` times after `judge.remote_backoff_s * 2**attempt` seconds; after the last, the rows of
the request get `judge.neutral_score` and count as failed. A step therefore never waits longer than about
(retries + 1) x timeout + the backoffs, and never crashes on the endpoint. Metrics: judge/remote/failure_frac,
judge/remote/retries, judge/remote/latency_s (mean per request, the successful attempt or the last),
judge/remote/latency_s_max.

Secrets: the URL and the API key come from `judge.remote_url` / `judge.remote_api_key` or, when those are empty,
the environment (RLAIF_JUDGE_URL, RLAIF_JUDGE_API_KEY). Neither appears in a log line, a metric, an error message
or the saved config (`redacted`).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

import ml_collections
import numpy as np

APIS = ("openai", "reward_api")
URL_ENV, KEY_ENV = "RLAIF_JUDGE_URL", "RLAIF_JUDGE_API_KEY"
SECRET_FIELDS = ("remote_url", "remote_api_key")
REDACTED = "<redacted>"
_INT_RE = re.compile(r"-?\d+")


def url_and_key(config: ml_collections.ConfigDict) -> tuple[str, str]:
    return (config.remote_url or os.environ.get(URL_ENV, ""), config.remote_api_key or os.environ.get(KEY_ENV, ""))


def check_config(config: ml_collections.ConfigDict) -> None:
    """The remote settings of `config.judge` (mode "remote"); never quotes the URL or key."""
    if config.remote_api not in APIS:
        raise ValueError(f"config.judge.remote_api={config.remote_api!r}; use one of {APIS}")
    url, _ = url_and_key(config)
    if not url:
        raise ValueError(f"config.judge.mode='remote' needs the endpoint's URL: set config.judge.remote_url or the "
                         f"environment variable {URL_ENV}")
    if not url.startswith(("http://", "https://")):
        raise ValueError("config.judge.remote_url (or $RLAIF_JUDGE_URL) must start with http:// or https://")
    if not (config.remote_timeout_s > 0 and config.remote_concurrency >= 1 and config.remote_batch_size >= 1):
        raise ValueError(f"config.judge.remote_timeout_s={config.remote_timeout_s}, remote_concurrency="
                         f"{config.remote_concurrency} and remote_batch_size={config.remote_batch_size} must be > 0")
    if config.remote_retries < 0 or config.remote_backoff_s < 0:
        raise ValueError(f"config.judge.remote_retries={config.remote_retries} and remote_backoff_s="
                         f"{config.remote_backoff_s} must be >= 0")
    if config.remote_api == "openai" and not config.remote_model:
        raise ValueError("config.judge.remote_api='openai' needs config.judge.remote_model (the served model's name)")
    if config.num_scores < 2:
        raise ValueError(f"config.judge.num_scores={config.num_scores}; needs at least 2")


def redacted(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of a run config with the remote judge's URL and key replaced (what is saved and sent to wandb)."""
    out = ml_collections.ConfigDict(c.to_dict())
    if "judge" in out:
        for name in SECRET_FIELDS:
            if out.judge.get(name):
                out.judge[name] = REDACTED
    return out


# ---------------------------------------------------------------------------------------------- parsing answers
def score_from_chat(answer: dict, num_scores: int) -> float:
    """The pointwise score of an OpenAI chat-completions answer: from the first token's top_logprobs over "1".."K"
    when present, else from the first integer in the text. Raises ValueError when neither gives one."""
    choice = answer["choices"][0]
    content = ((choice.get("logprobs") or {}).get("content")) or []
    if content:
        probs = np.zeros(num_scores)
        for entry in content[0].get("top_logprobs") or [content[0]]:
            token = str(entry.get("token", "")).strip()
            if token.isdigit() and 1 <= int(token) <= num_scores:
                probs[int(token) - 1] += math.exp(float(entry["logprob"]))
        if probs.sum() > 0:
            expected = float(probs @ np.arange(1, num_scores + 1)) / probs.sum()
            return 2.0 * (expected - 1.0) / (num_scores - 1) - 1.0
    text = (choice.get("message") or {}).get("content") or ""
    match = _INT_RE.search(text)
    if match and 1 <= int(match.group()) <= num_scores:
        return 2.0 * (int(match.group()) - 1.0) / (num_scores - 1) - 1.0
    raise ValueError("no score in the answer")


def scores_from_reward_api(answer: Any, count: int) -> list[float]:
    values = answer.get("rewards", answer.get("scores")) if isinstance(answer, dict) else answer
    if not isinstance(values, list) or len(values) != count:
        raise ValueError("the answer is not a list of one score per pair")
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise ValueError("a score is not finite")
    return out


# ---------------------------------------------------------------------------------------------- the client
@dataclasses.dataclass
class RemoteStats:
    rows: int = 0
    failed_rows: int = 0
    requests: int = 0
    retries: int = 0
    latencies: list = dataclasses.field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        lat = self.latencies or [0.0]
        return {"judge/remote/failure_frac": self.failed_rows / max(self.rows, 1),
                "judge/remote/retries": float(self.retries), "judge/remote/latency_s": float(np.mean(lat)),
                "judge/remote/latency_s_max": float(np.max(lat))}


class RemoteJudge:
    """Scores (prompt, response) texts at the endpoint of `config.judge` (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, render):
        check_config(config)
        self.config, self.render = config, render  # render(prompt, response) -> the judge prompt as text
        self._url, self._key = url_and_key(config)

    def _post(self, body: dict) -> Any:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self._url, json.dumps(body).encode(), headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.config.remote_timeout_s) as reply:
            return json.loads(reply.read().decode())

    def _request(self, body: dict, parse) -> tuple[Any, int, float]:
        """(parsed answer or None after the last failed attempt, retries used, latency of the last attempt)."""
        cfg = self.config
        for attempt in range(cfg.remote_retries + 1):
            if attempt:
                time.sleep(cfg.remote_backoff_s * 2 ** (attempt - 1))
            t0 = time.perf_counter()
            try:
                return parse(self._post(body)), attempt, time.perf_counter() - t0
            except Exception:  # noqa: BLE001  timeouts, connection and HTTP errors, garbage: retried, then neutral
                latency = time.perf_counter() - t0
        return None, cfg.remote_retries, latency

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[np.ndarray, np.ndarray, RemoteStats]:
        """(scores (N,) float32, failed (N,) bool, stats): the neutral score where every attempt failed."""
        cfg, n = self.config, len(prompts)
        if cfg.remote_api == "openai":
            jobs = [([i], {"model": cfg.remote_model, "temperature": 0.0, "max_tokens": cfg.remote_max_tokens,
                           "logprobs": True, "top_logprobs": 20,
                           "messages": [{"role": "user", "content": self.render(prompts[i], responses[i])}]},
                     lambda a: [score_from_chat(a, cfg.num_scores)]) for i in range(n)]
        else:
            size = cfg.remote_batch_size
            jobs = []
            for lo in range(0, n, size):
                rows = list(range(lo, min(lo + size, n)))
                jobs.append((rows, {"prompts": [prompts[i] for i in rows], "responses": [responses[i] for i in rows]},
                             lambda a, k=len(rows): scores_from_reward_api(a, k)))
        scores = np.full(n, cfg.neutral_score, np.float32)
        failed = np.zeros(n, bool)
        stats = RemoteStats(rows=n, requests=len(jobs))
        with concurrent.futures.ThreadPoolExecutor(max_workers=cfg.remote_concurrency) as pool:
            futures = [(rows, pool.submit(self._request, body, parse)) for rows, body, parse in jobs]
            for rows, future in futures:
                values, retries, latency = future.result()
                stats.retries += retries
                stats.latencies.append(latency)
                if values is None:
                    failed[rows] = True
                else:
                    scores[rows] = values
        stats.failed_rows = int(failed.sum())
        return scores, failed, stats
