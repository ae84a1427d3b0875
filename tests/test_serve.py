"""redrafter-serve on 127.0.0.1, driven with the official openai client (loopback only)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from conftest import (  # noqa: E402
    CHATML,
    char_tokenizer,
    write_tiny_hf,
)
from redrafter_trt.cli import build as build_cli  # noqa: E402
from redrafter_trt.cli import convert as convert_cli  # noqa: E402
from redrafter_trt.models.drafter import DrafterConfig, init_drafter, save_drafter  # noqa: E402

pytestmark = pytest.mark.full  # a server process per module and per signal test: the full tier

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return build_engine(tmp_path_factory.mktemp("serve"))


def build_engine(root: Path, *convert_extra) -> Path:
    """The tiny Llama engine the server tests use (``convert_extra``: more convert flags)."""
    base = write_tiny_hf(root / "base", "llama", seed=4)
    drafter = save_drafter(
        init_drafter(DrafterConfig(97, 32, 64, 1, True), seed=2, std=0.5), root / "drafter"
    )
    assert (
        convert_cli.main(
            [
                str(a)
                for a in [
                    "--model_dir",
                    base,
                    "--drafter_model_dir",
                    drafter,
                    "--output_dir",
                    root / "ckpt",
                    "--redrafter_num_beams",
                    3,
                    "--redrafter_draft_len_per_beam",
                    2,
                    *convert_extra,
                ]
            ]
        )
        == 0
    )
    engine = root / MODEL
    assert (
        build_cli.main(
            [
                str(a)
                for a in [
                    "--checkpoint_dir",
                    root / "ckpt",
                    "--output_dir",
                    engine,
                    "--backend",
                    "torch",
                    "--max_batch_size",
                    8,
                    "--max_input_len",
                    48,
                    "--max_seq_len",
                    128,
                ]
            ]
        )
        == 0
    )
    char_tokenizer(CHATML).save_pretrained(str(engine))
    return engine


def start_server(engine_dir, *extra):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "redrafter_trt.cli.serve",
            "--engine_dir",
            str(engine_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--threads",
            "1",
            *map(str, extra),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):  # bounded: 120 s
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError("server did not come up in 120 s")


def stop_server(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.fixture(scope="module")
def server_proc(engine_dir):
    # prompts longer than 8 tokens are prefilled in chunks: every output below is compared with
    # the runtime's whole-prompt prefill or a request served alone
    proc, url = start_server(engine_dir, "--max_queue", 10, "--prefill_chunk", 8)
    yield proc, url
    stop_server(proc)


@pytest.fixture(scope="module")
def server(server_proc):
    return server_proc[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)


def metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_models_health_metrics(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    text = httpx.get(server + "/metrics").text
    for name in (
        "redrafter_requests_total",
        "redrafter_queue_depth",
        "redrafter_batch_occupancy",
        "redrafter_output_tokens_per_second",
        "redrafter_step_seconds",
        "redrafter_tokens_per_step",
        'redrafter_draft_accepted_total{depth="2"}',
    ):
        assert name in text, name


def test_completion_and_chat_equal_the_runtime(client, engine_dir):
    from redrafter_trt import load

    gen = load(engine_dir, device="cpu")
    want = gen.generate(["hello there"], max_new_tokens=20, ignore_eos=True)[0]
    raw = client.completions.with_raw_response.create(
        model=MODEL,
        prompt="hello there",
        max_tokens=20,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    r = raw.parse()
    assert r.choices[0].text == want.text and r.usage.completion_tokens == 20
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    # the steps' shapes follow the adaptive policy (its acceptance estimate has seen other
    # requests): the text is the same, and the header agrees with the response's own steps
    steps = r.model_extra["redrafter"]["accepted_per_step"]
    tps = float(raw.headers["x-redrafter-tokens-per-step"])
    assert tps == pytest.approx(sum(steps[1:]) / len(steps[1:]), abs=1e-3)

    chat_want = gen.generate(["what is 2+2?"], max_new_tokens=16, use_chat_template=True)[0]
    c = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "what is 2+2?"}],
        max_tokens=16,
        temperature=0,
    )
    assert (
        c.choices[0].message.content == chat_want.text and c.choices[0].message.role == "assistant"
    )
    assert c.choices[0].finish_reason == (
        "length" if chat_want.finish_reason == "length" else "stop"
    )


def test_streaming_deltas_concatenate_to_the_full_text(client):
    kw = dict(
        model=MODEL,
        prompt="stream me",
        max_tokens=24,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == full
    assert (
        chunks[-1].usage.completion_tokens == 24 and chunks[-1].choices[0].finish_reason == "length"
    )
    assert len([c for c in chunks if c.choices[0].text]) > 1  # really incremental
    msgs = [{"role": "user", "content": "hi"}]
    full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
    parts = list(
        client.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=12, temperature=0, stream=True
        )
    )
    assert (
        "".join(p.choices[0].delta.content or "" for p in parts) == full.choices[0].message.content
    )
    assert parts[-1].usage.completion_tokens == full.usage.completion_tokens


def test_stop_strings_cut_before_the_stop(client):
    kw = dict(
        model=MODEL, prompt="abc", max_tokens=30, temperature=0, extra_body={"ignore_eos": True}
    )
    full = client.completions.create(**kw).choices[0].text
    stop = full[8:10]
    assert len(stop) == 2
    cut = full[: full.find(stop)]
    r = client.completions.create(stop=[stop, "NEVER-SEEN"], **kw)
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kw)
    )
    assert streamed == cut


def test_seeded_sampling_is_reproducible(client):
    kw = dict(
        model=MODEL,
        prompt="sample",
        max_tokens=20,
        temperature=1.0,
        top_p=0.95,
        extra_body={"top_k": 40, "ignore_eos": True},
    )
    a = [client.completions.create(seed=s, **kw).choices[0].text for s in (1, 2, 3)]
    b = [client.completions.create(seed=s, **kw).choices[0].text for s in (1, 2, 3)]
    assert a == b and len(set(a)) > 1


def test_concurrent_requests_equal_their_single_outputs(client):
    reqs = [
        dict(
            prompt=f"prompt {i} " + "xy" * (i % 5),
            max_tokens=8 + i % 9,
            temperature=0 if i % 2 else 0.8,
            seed=i,
            extra_body={"ignore_eos": i % 3 == 0},
        )
        for i in range(16)
    ]
    solo = [client.completions.create(model=MODEL, **r).choices[0].text for r in reqs]
    with ThreadPoolExecutor(16) as ex:
        together = list(
            ex.map(lambda r: client.completions.create(model=MODEL, **r).choices[0].text, reqs)
        )
    assert together == solo


BAD = [
    (b"{not json", "valid JSON"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"model": MODEL, "prompt": 5}, "prompt"),
    ({"model": "gpt-4", "prompt": "x"}, "unknown model"),
    ({"model": MODEL, "prompt": ""}, "empty"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 1000}, "beyond the engine"),
    ({"model": MODEL, "prompt": "y" * 60}, "more than the engine takes"),
    ({"model": MODEL, "prompt": "x", "n": 2}, "'n'"),
    ({"model": MODEL, "prompt": "x", "logprobs": 6}, "'logprobs'"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, "temperature"),
    ({"model": MODEL, "prompt": "x", "stop": [1]}, "stop"),
]


def test_bad_requests_get_400_and_the_server_keeps_serving(server, client):
    for body, fragment in BAD:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(
            server + "/v1/completions",
            content=content,
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert fragment in err["message"] and err["type"] == "invalid_request_error", (body, err)
    for body, fragment in [
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "user"}]}, "messages[0]"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": []}, "'tools'"),
    ]:
        r = httpx.post(server + "/v1/chat/completions", json=body)
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text
    with pytest.raises(openai.BadRequestError, match="unknown model"):
        client.completions.create(model="nope", prompt="x")
    assert (
        client.completions.create(
            model=MODEL, prompt="still here", max_tokens=3
        ).usage.completion_tokens
        >= 1
    )


# --------------------------------------------------------------------------- the OpenAI contract
def test_openapi_publishes_the_request_and_response_bodies(server):
    doc = httpx.get(server + "/openapi.json").json()
    schemas = doc["components"]["schemas"]

    def resolve(s):
        return schemas[s["$ref"].rsplit("/", 1)[1]]

    for path, field, response in (
        ("/v1/completions", "prompt", "CompletionResponse"),
        ("/v1/chat/completions", "messages", "ChatCompletionResponse"),
    ):
        op = doc["paths"][path]["post"]
        body = resolve(op["requestBody"]["content"]["application/json"]["schema"])
        assert field in body["required"] and "model" in body["required"]
        assert body["additionalProperties"] is False
        assert body["properties"]["model"]["enum"] == [MODEL]
        assert "logprobs" in body["properties"]
        ok = op["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok["$ref"].endswith("/" + response) and "choices" in resolve(ok)["properties"]
        err = resolve(op["responses"]["400"]["content"]["application/json"]["schema"])
        assert err["required"] == ["error"]


OUTSIDE_THE_SCHEMA = [  # (chat body without "model", what the message names); before: 200 or 400
    ({"messages": [{"role": "user", "content": "x"}], "user": 5}, "'user'"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x", "name": 3}]}, "messages[0].name"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
    (
        {"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": 1}},
        "stream_options",
    ),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "'logprobs': true"),
    (
        {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
        "top_logprobs",
    ),
    ({"messages": [{"role": "user", "content": "x"}], "seed": 2**64}, "seed"),
]


@pytest.mark.parametrize("body, fragment", OUTSIDE_THE_SCHEMA)
def test_requests_outside_the_openai_schema_get_400(server, body, fragment):
    r = httpx.post(server + "/v1/chat/completions", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error", err


def test_unknown_paths_and_methods_answer_the_openai_error_object(server):
    for r in (httpx.get(server + "/v1/nope"), httpx.put(server + "/v1/completions")):
        assert r.status_code in (404, 405) and set(r.json()) == {"error"}, r.text


def test_content_as_an_array_of_text_parts(client):
    kw = dict(model=MODEL, max_tokens=8, temperature=0)
    text = client.chat.completions.create(
        messages=[{"role": "user", "content": "what is 2+2?"}], **kw
    )
    parts = client.chat.completions.create(
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "what is "}, {"type": "text", "text": "2+2?"}],
            }
        ],
        **kw,
    )
    assert parts.choices[0].message.content == text.choices[0].message.content
    assert parts.usage.prompt_tokens == text.usage.prompt_tokens


def test_logprobs_on_both_endpoints(client):
    c = client.completions.create(
        model=MODEL, prompt="tea", max_tokens=6, temperature=0, logprobs=3, extra_body={}
    )
    lp = c.choices[0].logprobs
    n = c.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and value <= 0
        assert value == pytest.approx(max(top.values()))  # greedy: the most likely token
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6)
    r = client.chat.completions.create(
        **chat, temperature=0.8, seed=5, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.logprob <= t.top_logprobs[0].logprob + 1e-6 and t.bytes == list(t.token.encode())
    # streamed: the chunks' log-probabilities are the same list
    parts = client.chat.completions.create(
        **chat, temperature=0.8, seed=5, logprobs=True, top_logprobs=2, stream=True
    )
    streamed = [
        t
        for p in parts
        if p.choices and p.choices[0].logprobs
        for t in p.choices[0].logprobs.content
    ]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    # without logprobs: none
    assert client.chat.completions.create(**chat, temperature=0).choices[0].logprobs is None


def test_logprobs_are_the_same_with_and_without_speculation(tmp_path):
    """Through the server, greedy and seeded, on a float32 engine: the same tokens and the same
    log-probabilities (up to float32 rounding of differently shaped forwards) from a speculative
    server and a --no_speculation one."""
    engine = build_engine(tmp_path, "--dtype", "float32")
    answers = []
    for extra in ((), ("--no_speculation",)):
        proc, url = start_server(engine, *extra)
        try:
            c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
            got = []
            for sampling in ({"temperature": 0}, {"temperature": 0.9, "seed": 3}):
                r = c.completions.create(
                    model=MODEL, prompt="tea is", max_tokens=12, logprobs=2, **sampling
                )
                lp = r.choices[0].logprobs
                got.append((r.choices[0].text, lp.tokens, lp.token_logprobs, lp.top_logprobs))
                r = c.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=12,
                    logprobs=True,
                    top_logprobs=2,
                    **sampling,
                )
                content = r.choices[0].logprobs.content
                got.append(
                    (
                        r.choices[0].message.content,
                        [t.token for t in content],
                        [t.logprob for t in content],
                        [{x.token: x.logprob for x in t.top_logprobs} for t in content],
                    )
                )
        finally:
            stop_server(proc)
        answers.append(got)
    for spec, plain in zip(*answers):
        assert spec[:2] == plain[:2] and len(spec[1]) >= 1
        assert spec[2] == pytest.approx(plain[2], abs=1e-5)
        for a, b in zip(spec[3], plain[3]):
            assert a.keys() == b.keys() and list(a.values()) == pytest.approx(
                list(b.values()), abs=1e-5
            )


def test_full_queue_gets_429_with_retry_after(server, client):
    body = {
        "model": MODEL,
        "prompt": "fill",
        "max_tokens": 70,
        "temperature": 0,
        "ignore_eos": True,
    }
    with ThreadPoolExecutor(26) as ex:
        rs = list(
            ex.map(
                lambda _: httpx.post(server + "/v1/completions", json=body, timeout=300), range(26)
            )
        )
    codes = sorted(r.status_code for r in rs)
    full = [r for r in rs if r.status_code == 429]
    assert full and set(codes) == {200, 429}, codes
    assert (
        full[0].headers["retry-after"] == "1"
        and "queue is full" in full[0].json()["error"]["message"]
    )
    texts = {r.json()["choices"][0]["text"] for r in rs if r.status_code == 200}
    assert len(texts) == 1  # the same greedy request: the same output in every slot
    assert (
        client.completions.create(model=MODEL, prompt="after", max_tokens=3).usage.completion_tokens
        >= 1
    )


def wait_idle(url: str) -> None:
    for _ in range(100):  # bounded: 20 s
        if metric(url, "redrafter_batch_rows") == 0 and metric(url, "redrafter_queue_depth") == 0:
            return
        time.sleep(0.2)
    raise AssertionError("rows still running")


def test_client_disconnect_frees_the_slot(server):
    before = metric(server, 'redrafter_requests_total{outcome="cancelled"}')
    body = {"model": MODEL, "prompt": "long", "max_tokens": 100, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break
    wait_idle(server)
    assert metric(server, 'redrafter_requests_total{outcome="cancelled"}') == before + 1


def test_small_soak_with_random_cancels(server_proc, server, client):
    rng = random.Random(0)
    reqs = [
        dict(
            prompt="soak " + "ab" * rng.randint(0, 15),
            max_tokens=rng.randint(1, 40),
            temperature=rng.choice([0, 0, 0.7, 1.0]),
            seed=i,
            extra_body={"ignore_eos": rng.random() < 0.5},
        )
        for i in range(60)
    ]
    cancel = {i for i in range(60) if rng.random() < 0.25}
    solo = {
        i: client.completions.create(model=MODEL, **r).choices[0].text
        for i, r in enumerate(reqs)
        if i not in cancel and i % 3 == 0
    }
    wait_idle(server)
    rss_before = rss_mib(server_proc[0].pid)  # after the solo runs warmed every path up

    def one(i):
        r = reqs[i]
        if i in cancel:  # read one event, then hang up
            body = {
                "model": MODEL,
                "stream": True,
                **{k: v for k, v in r.items() if k != "extra_body"},
                **r["extra_body"],
            }
            with httpx.stream("POST", server + "/v1/completions", json=body, timeout=120) as s:
                for line in s.iter_lines():
                    if line.startswith("data:"):
                        break
            return None
        return client.completions.create(model=MODEL, **r).choices[0].text

    with ThreadPoolExecutor(10) as ex:
        got = list(ex.map(one, range(60)))
    assert all(isinstance(got[i], str) for i in range(60) if i not in cancel)  # none lost
    assert {i: got[i] for i in solo} == solo  # none corrupted
    wait_idle(server)
    # memory flat: what 60 requests leave behind stays under 16 MiB (the soak bench's tolerance)
    assert rss_mib(server_proc[0].pid) - rss_before < 16


def test_sigterm_finishes_running_requests_and_exits(engine_dir):
    proc, url = start_server(engine_dir, "--graceful_timeout", 20)
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(
            lambda: c.completions.create(
                model=MODEL, prompt="last one", max_tokens=60, extra_body={"ignore_eos": True}
            )
        )
        for _ in range(100):
            if metric(url, "redrafter_batch_rows") >= 1:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        # while the running request finishes, a new client is refused at connect (docs/usage.md
        # says so): it never gets an HTTP answer such as 503
        answered = []
        for _ in range(100):
            try:
                answered.append(httpx.get(url + "/health", timeout=2).status_code)
            except httpx.ConnectError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"still accepting connections after SIGTERM: {answered}")
        assert 503 not in answered, answered
        r = fut.result(60)
    assert r.usage.completion_tokens == 60  # the running request was finished, not dropped
    assert proc.wait(60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)
    serving = (REPO / "docs" / "usage.md").read_text().split("## Serving")[1].split("\n## ")[0]
    assert "shutting down answers 503" not in serving
    assert "new connections are refused" in serving


def test_port_0_announces_the_port_it_bound(engine_dir):
    import re

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "redrafter_trt.cli.serve", "--engine_dir", str(engine_dir)]
        + ["--port", "0", "--threads", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = ""
        for _ in range(50):  # bounded: the announcement is the command's first lines
            line = proc.stdout.readline()
            if "redrafter-serve: model" in line or not line:
                break
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, line
        port = int(m.group(1))
        assert port != 0, line  # before: http://127.0.0.1:0
        for _ in range(120):
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert r.status_code == 200
    finally:
        stop_server(proc)


def test_bad_flags_exit_2_with_a_message(engine_dir, tmp_path, capsys):
    from redrafter_trt.cli import serve as serve_cli

    assert serve_cli.main(["--engine_dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "--engine_dir" in err and "nope: not found" in err
    assert serve_cli.main(["--engine_dir", str(engine_dir), "--max_batch_size", "99"]) == 2
    assert "exceeds the engine's max_batch_size 8" in capsys.readouterr().err
    assert serve_cli.main(["--engine_dir", str(engine_dir), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        serve_cli.main(["--engine_dir", str(engine_dir), "--prefill_chunk", "-3"])
    assert (
        exit_.value.code == 2 and "--prefill_chunk: must be >= 0, got -3" in capsys.readouterr().err
    )
    assert (
        serve_cli.main(
            ["--engine_dir", str(engine_dir), "--prefill_chunk", "64", "--max_prefill_tokens", "9"]
        )
        == 2
    )
    assert "--prefill_chunk 0" in capsys.readouterr().err
    text = serve_cli.build_parser().format_help()
    for flag in (
        "--engine_dir",
        "--host",
        "--port",
        "--max_queue",
        "--no_speculation",
        "--graceful_timeout",
        "--prefill_chunk",
    ):
        assert flag in text


# --------------------------------------------------------------------------- UTF-8 over byte tokens
#: the text the byte-level engine below repeats: every character is 2-4 byte tokens, all distinct
CYCLE = "☕é🍵茶"


@pytest.fixture(scope="module")
def byte_engine_dir(tmp_path_factory):
    """An engine whose base model greedily continues ``CYCLE`` forever, with a byte-level BPE
    tokenizer (each character several tokens): one layer whose attention and MLP outputs are zero,
    so the hidden state is the current token's embedding, and an lm_head row per cycle token that
    matches its predecessor's normalised embedding."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from redrafter_trt.bench.serving import byte_level_tokenizer

    root = tmp_path_factory.mktemp("serve_bytes")
    tok = byte_level_tokenizer()
    ids = tok(CYCLE, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(CYCLE.encode()) == len(set(ids))  # one token per byte, none repeated
    v, h = len(tok), 64
    torch.manual_seed(3)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=v,
            hidden_size=h,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            initializer_range=1.0,
            eos_token_id=tok.eos_token_id,
            bos_token_id=None,
        )
    )
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        unit = (
            emb / emb.pow(2).mean(-1, keepdim=True).sqrt()
        )  # what the final RMSNorm makes of them
        model.lm_head.weight.zero_()
        for k, t in enumerate(ids):
            model.lm_head.weight[ids[(k + 1) % len(ids)]] = unit[t]
    model.save_pretrained(str(root / "base"))
    drafter = save_drafter(
        init_drafter(DrafterConfig(v, h, 2 * h, 1, True), seed=2, std=0.5), root / "drafter"
    )
    assert (
        convert_cli.main(
            [
                str(a)
                for a in [
                    "--model_dir",
                    root / "base",
                    "--drafter_model_dir",
                    drafter,
                    "--output_dir",
                    root / "ckpt",
                    "--redrafter_num_beams",
                    2,
                    "--redrafter_draft_len_per_beam",
                    2,
                ]
            ]
        )
        == 0
    )
    engine = root / MODEL
    assert (
        build_cli.main(
            [
                str(a)
                for a in [
                    "--checkpoint_dir",
                    root / "ckpt",
                    "--output_dir",
                    engine,
                    "--backend",
                    "torch",
                    "--max_batch_size",
                    4,
                    "--max_input_len",
                    32,
                    "--max_seq_len",
                    96,
                ]
            ]
        )
        == 0
    )
    tok.save_pretrained(str(engine))
    return engine


@pytest.mark.parametrize("speculative", [True, False])
def test_streamed_deltas_never_split_a_utf8_character(byte_engine_dir, speculative):
    proc, url = start_server(byte_engine_dir, *([] if speculative else ["--no_speculation"]))
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        n = 3 * len(CYCLE.encode())  # three times round the cycle, in tokens
        kw = dict(
            model=MODEL, prompt="茶", max_tokens=n, temperature=0, extra_body={"ignore_eos": True}
        )
        full = c.completions.create(**kw).choices[0].text
        assert full == CYCLE * 3  # the model is what the fixture says: characters over 2-4 tokens
        chunks = list(c.completions.create(stream=True, **kw))
        deltas = [ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].text]
        assert "".join(deltas) == full
        assert not any("\ufffd" in d for d in deltas)  # no delta carries part of a character
        assert chunks[-1].usage.completion_tokens == n
        # the stream really was cut inside characters: fewer text deltas than tokens, and with
        # plain decoding (one token per step) one delta per character
        assert len(deltas) < n
        if not speculative:
            assert deltas == list(full)
        msgs = [
            {"role": "user", "content": "hi"}
        ]  # chat: whatever the text, deltas are whole characters
        parts = [
            p.choices[0].delta.content
            for p in c.chat.completions.create(
                model=MODEL, messages=msgs, max_tokens=20, temperature=0, stream=True
            )
            if p.choices
        ]
        whole = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20, temperature=0)
        assert "".join(p or "" for p in parts) == whole.choices[0].message.content
    finally:
        stop_server(proc)


# --------------------------------------------------------------------------- the serving benchmark's modes
def test_bench_soak_and_stall_modes_on_the_tiny_engine(tmp_path):
    """``--soak`` (small N) passes and reports what it checked; ``--stall`` shows the running stream
    getting tokens while a long prompt is prefilled in chunks, and none while it is prefilled whole."""
    from redrafter_trt.bench import serving as bench

    tiny = tmp_path / "tiny"
    out = tmp_path / "soak.json"
    assert (
        bench.main(
            [
                "--tiny_engine",
                str(tiny),
                "--soak",
                "24",
                "--soak_clients",
                "6",
                "--prefill_chunk",
                "16",
                "--threads",
                "1",
                "--rss_tolerance_mib",
                "64",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    r = json.loads(out.read_text())
    assert r["passed"] and r["lost"] == 0 and r["corrupt_greedy"] == 0 and r["corrupt_sampled"] == 0
    assert (
        r["completed"] + r["cancelled"] == 24
        and r["completed"] == r["greedy_checked"] + r["sampled_checked"]
    )
    assert r["idle_after"] and r["slots_free_after"] == r["slots"]
    out = tmp_path / "stall.json"
    assert (
        bench.main(
            [
                "--tiny_engine",
                str(tiny),
                "--stall",
                "--stall_repeats",
                "1",
                "--prefill_chunk",
                "0",
                "16",
                "--threads",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    whole, chunked = json.loads(out.read_text())["settings"]
    assert whole["prefill_chunk"] == 0 and whole["running_events_during_prefill"][0] <= 1
    assert (
        chunked["prefill_chunk"] == 16 and chunked["running_events_during_prefill"][0] >= 4
    )  # 96 tokens / 16


def test_serving_bench_records_the_policy_and_threads_it_ran(engine_dir, tmp_path):
    """The speculative mode's policy (fixed shape, or adaptive from a stored cost model with the
    shapes it chose) and the torch threads are in the JSON (before: neither)."""
    import shutil

    from redrafter_trt.bench import serving as bench
    from redrafter_trt.runtime.adaptive import (
        CostModel,
        machine_fingerprint,
        save_cost_model,
    )
    from redrafter_trt.runtime.loader import load

    engine = tmp_path / "tiny"
    shutil.copytree(engine_dir, engine)
    args = ["--engine_dir", str(engine), "--concurrency", "1", "--requests_per_client", "1"]
    args += ["--max_tokens", "4", "--threads", "1", "--modes", "speculative"]
    out = tmp_path / "fixed.json"
    assert bench.main(args + ["--out", str(out), "--adaptive", "off"]) == 0
    r = json.loads(out.read_text())
    assert r["speculative_policy"].startswith("fixed 3x2"), r
    assert r["threads"] == 1 and r["threads_source"] == "--threads"
    assert r["levels"]["speculative"][0]["chosen_shapes"] is None
    # a stored cost model under which drafting never pays: the adaptive policy, plain steps
    sig = load(engine, adaptive="off").backend.engine_signature()
    save_cost_model(
        CostModel({1: 1.0, 64: 1000.0}, {1: 100.0, 8: 100.0}, sig, machine_fingerprint(1)), engine
    )
    out = tmp_path / "adaptive.json"
    assert bench.main(args + ["--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["speculative_policy"].startswith("adaptive"), r
    shapes = r["levels"]["speculative"][0]["chosen_shapes"]
    assert [c["shape"] for c in shapes] == ["1x0"], shapes
    out = tmp_path / "off.json"
    assert bench.main(args + ["--adaptive", "off", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["speculative_policy"].startswith("fixed 3x2")
