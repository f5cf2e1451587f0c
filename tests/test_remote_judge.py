"""The remote judge (rlaif_jax/judging/remote.py): parsing of chat-completions and reward-API answers against
hand-computed scores, retries and the neutral fallback against a local server, and a training run against a server
that times out, answers garbage and fails, which completes with the failures logged and the URL nowhere."""
import http.server
import itertools
import json
import math
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from rlaif_jax import config as config_lib
from rlaif_jax.judging import remote
from tests import tiny
from tests.test_train import CONFIG, ROOT, env, read_metrics


def chat_answer(text, top=None):
    choice = {"message": {"content": text}}
    if top is not None:
        choice["logprobs"] = {"content": [{"token": top[0][0], "logprob": math.log(top[0][1]),
                                           "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in top]}]}
    return {"choices": [choice]}


def test_chat_score_from_logprobs_then_text():
    # P over the K = 5 score tokens: 4: 0.5, 5: 0.25, 3: 0.25 (" 3" with its space); "x" is no score token.
    # E = 4 * 0.5 + 5 * 0.25 + 3 * 0.25 = 4.0; score = 2 (E - 1) / (K - 1) - 1 = 0.5.
    answer = chat_answer("4", [("4", 0.5), ("5", 0.25), (" 3", 0.25), ("x", 0.1)])
    assert remote.score_from_chat(answer, 5) == pytest.approx(0.5)
    # Renormalised over the score tokens: 1: 0.2, 2: 0.2 -> E = 1.5 -> 2 * 0.5 / 4 - 1 = -0.75.
    answer = chat_answer("1", [("1", 0.2), ("2", 0.2), ("yes", 0.6)])
    assert remote.score_from_chat(answer, 5) == pytest.approx(-0.75)
    # No logprobs: the first integer of the text, k = 2 -> 2 * 1 / 4 - 1 = -0.5; none among the logprobs: the text.
    assert remote.score_from_chat(chat_answer("Score: 2 of 5"), 5) == pytest.approx(-0.5)
    assert remote.score_from_chat(chat_answer("5", [("five", 0.9)]), 5) == pytest.approx(1.0)
    for bad in (chat_answer("7"), chat_answer("great"), chat_answer("", [("x", 0.5)])):
        with pytest.raises(ValueError):
            remote.score_from_chat(bad, 5)


def test_reward_api_answers():
    assert remote.scores_from_reward_api({"rewards": [1, 2.5]}, 2) == [1.0, 2.5]
    assert remote.scores_from_reward_api({"scores": [0.5]}, 1) == [0.5]
    assert remote.scores_from_reward_api([-1.0, 0.0], 2) == [-1.0, 0.0]
    for bad in ({"rewards": [1.0]}, {"rewards": [1.0, float("nan")]}, {"other": [1, 2]}, "1, 2"):
        with pytest.raises((ValueError, TypeError)):
            remote.scores_from_reward_api(bad, 2)


class FaultyServer:
    """A local HTTP judge on 127.0.0.1 in a thread, bounded in requests and time, stopping by itself. Request k
    (counted over the server's life) is answered by behaviours[k % len(behaviours)]: "ok" (chat completions with
    logprobs, or the reward API's scores, by the path), "text" (chat completions without logprobs), "slow" (answers
    after `slow_s`), "garbage" (not JSON), "fail" (HTTP 500)."""

    def __init__(self, behaviours, slow_s=1.0, max_requests=2000, max_seconds=240.0):
        counter, lock = itertools.count(), threading.Lock()
        self.requests = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    k = next(counter)
                    outer.requests += 1
                if k >= max_requests:
                    threading.Thread(target=outer.server.shutdown, daemon=True).start()
                behaviour = behaviours[k % len(behaviours)]
                if behaviour == "slow":
                    time.sleep(slow_s)
                if behaviour == "fail":
                    self.send_error(500, "judge overloaded")
                    return
                if behaviour == "garbage":
                    payload = b"<html>not json"
                elif "responses" in body:  # the reward API: the response's word count
                    payload = json.dumps({"rewards": [len(r.split()) for r in body["responses"]]}).encode()
                elif behaviour == "text":
                    payload = json.dumps(chat_answer("Score : 4")).encode()
                else:
                    payload = json.dumps(chat_answer("5", [("5", 0.6), ("1", 0.2), ("3", 0.2)])).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/chat/completions"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.timer = threading.Timer(max_seconds, self.server.shutdown)

    def __enter__(self):
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()


def judge_config(url, **fields):
    c = config_lib.base_config().judge
    c.mode, c.remote_url, c.remote_model, c.remote_timeout_s, c.remote_backoff_s = "remote", url, "m", 0.5, 0.01
    c.neutral_score = -0.125
    for k, v in fields.items():
        c[k] = v
    return c


def test_client_retries_then_falls_back_to_neutral():
    # E over (5: 0.6, 1: 0.2, 3: 0.2) = 3.8 -> 2 * 2.8 / 4 - 1 = 0.4; the text answer "Score : 4" -> 0.5.
    with FaultyServer(["ok", "text"]) as server:
        scores, failed, stats = remote.RemoteJudge(judge_config(server.url, remote_concurrency=1),
                                                   lambda p, r: r).score(["p"] * 4, ["r"] * 4)
    np.testing.assert_allclose(scores, [0.4, 0.5, 0.4, 0.5], rtol=1e-6)
    assert not failed.any() and stats.retries == 0
    # Every attempt fails: 3 requests x (1 + 2 retries) attempts, each row neutral.
    with FaultyServer(["garbage", "fail", "slow"]) as server:
        t0 = time.perf_counter()
        scores, failed, stats = remote.RemoteJudge(judge_config(server.url, remote_retries=2, remote_concurrency=3),
                                                   lambda p, r: r).score(["p"] * 3, ["r"] * 3)
        assert time.perf_counter() - t0 < 5.0
        assert server.requests == 9
    np.testing.assert_array_equal(scores, [-0.125] * 3)
    assert failed.all() and stats.retries == 6 and stats.metrics()["judge/remote/failure_frac"] == 1.0
    # The reward API, 2 pairs per request; the first attempt of every request fails, the retry succeeds.
    with FaultyServer(["fail", "ok"]) as server:
        scores, failed, stats = remote.RemoteJudge(
            judge_config(server.url, remote_api="reward_api", remote_batch_size=2, remote_concurrency=1,
                         remote_retries=1), lambda p, r: r).score(["p"] * 3, ["a", "a b", "a b c"])
    np.testing.assert_array_equal(scores, [1, 2, 3])
    assert not failed.any() and stats.retries == 2 and stats.requests == 2


def test_validation_and_redaction(monkeypatch):
    monkeypatch.delenv(remote.URL_ENV, raising=False)
    with pytest.raises(ValueError, match="needs the endpoint's URL"):
        remote.check_config(judge_config(""))
    monkeypatch.setenv(remote.URL_ENV, "http://secret-host:8000/v1/chat/completions")
    remote.check_config(judge_config(""))
    for fields, message in (({"remote_api": "grpc"}, "remote_api='grpc'"), ({"remote_retries": -1}, "must be >= 0"),
                            ({"remote_model": ""}, "needs config.judge.remote_model")):
        with pytest.raises(ValueError, match=message) as e:
            remote.check_config(judge_config("http://secret-host:1", **fields))
        assert "secret-host" not in str(e.value)
    c = config_lib.base_config()
    c.judge.mode, c.judge.remote_url, c.judge.remote_api_key = "remote", "http://secret-host:1", "sk-secret"
    text = remote.redacted(c).to_json_best_effort()
    assert "secret" not in text and c.judge.remote_api_key == "sk-secret"


def test_training_run_against_a_faulty_server_completes_with_the_neutral_fallback(tmp_path_factory):
    """tests/tiny_config.py's run with the judge at a local server that answers 1 in 5 requests after the timeout,
    1 in 5 with garbage and 1 in 5 with HTTP 500, and a Python reward function: the run completes, every step logs
    the remote failure rate and retries, some rows fell back to the neutral score, and the URL appears in no log
    line, metric or saved file."""
    world = str(tmp_path_factory.mktemp("world"))
    tiny.make_world(world)
    workdir = str(tmp_path_factory.mktemp("remote_run"))
    with FaultyServer(["ok", "slow", "garbage", "text", "fail"], slow_s=1.0) as server:
        e = env(str(tmp_path_factory.mktemp("xla_cache")))
        e[remote.URL_ENV] = server.url
        overrides = ["--config.judge.mode=remote", "--config.judge.path=", "--config.judge.remote_model=tiny",
                     "--config.judge.remote_timeout_s=0.5", "--config.judge.remote_retries=1",
                     "--config.judge.remote_backoff_s=0.01", "--config.judge.remote_concurrency=8",
                     "--config.eval.win_rate=False", "--config.eval.pairwise_template=", "--config.train.steps=3", "--config.eval.every=3",
                     "--config.checkpoint.every_steps=3", "--config.train.export_final=False"]
        functions = ["--config.reward.functions={'bs': 'tests.test_reward_functions:count_b'}",
                     "--config.reward.function_weights={'bs': 0.5}"]
        proc = subprocess.run([sys.executable, "-m", "rlaif_jax.train", f"--config={CONFIG}:{world}",
                               f"--workdir={workdir}", *overrides, *functions], env=e, capture_output=True,
                              text=True, cwd=ROOT, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "host path (rollout program -> host reward -> learn program) for a remote judge" in proc.stderr
    steps = [m for m in read_metrics(workdir) if "judge/remote/failure_frac" in m]
    assert len(steps) == 3
    assert all(np.isfinite(m["judge/score"]) and np.isfinite(m["reward/function/bs"]) for m in steps)
    failure = np.mean([m["judge/remote/failure_frac"] for m in steps])
    assert 0 < failure < 1 and sum(m["judge/remote/retries"] for m in steps) > 0
    assert np.isfinite(read_metrics(workdir)[-1]["eval/judge_score"])
    host = server.url.split("/")[2]  # 127.0.0.1:PORT
    for name in os.listdir(workdir):
        path = os.path.join(workdir, name)
        if os.path.isfile(path):
            assert host not in open(path).read(), name
    assert host not in proc.stderr and host not in proc.stdout
