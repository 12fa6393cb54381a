"""The /v1 endpoints, driven by the real `openai` client against a live server (uvicorn on a free
port of 127.0.0.1, in a thread): what an OpenAI tool sees when it talks to a book model."""

import re
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

import server
from app.web import openai as v1
from app.web.generation_queue import GENERATION_QUEUE, GENERATION_RETRY_AFTER_S
from app.web.openai import Message, TextPart, chat_prompt, first_stop, stop_prefix_len, stops_of
from conftest import LOCAL_URL, ROOT, quick_train_config, tiny_config, trained_store
from generate import SamplingConfig, generate, stream
from lora import LoRAConfig
from app.runs import finetune
from app.store import Store

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def home(tmp_path_factory, book_text):
    """A tiny trained model 'tiny' with an adapter 'ad', and a model 'fresh' that was never trained."""
    store = trained_store(tmp_path_factory.mktemp("v1") / "home", book_text)
    finetune(store, "tiny", ["book"], quick_train_config(steps=5), "ad", LoRAConfig(r=2))
    store.create_model("fresh", tiny_config())
    return store.home


@contextmanager
def live(home, api_key=None):
    """create_app(home) served by uvicorn in a thread; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(server.create_app(home, api_key=api_key), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def client(home):
    with live(home) as url:
        yield openai.OpenAI(base_url=url, api_key="anything", max_retries=0)


def test_models_lists_every_model_and_adapter_that_can_generate(client):
    assert sorted(m.id for m in client.models.list()) == ["tiny", "tiny:ad"]  # not 'fresh': never trained


def test_a_completion_is_what_generate_writes_with_the_same_seed(client, home):
    r = client.completions.create(model="tiny", prompt="Once upon", max_tokens=8, temperature=0.9, seed=3)
    store = Store(home)
    ours = generate(store.load_model("tiny").eval(), store.tokenizer("tiny"), "Once upon",
                    SamplingConfig(max_new_tokens=8, temperature=0.9, seed=3))
    assert r.choices[0].text == ours and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.model == "tiny"


def test_streamed_pieces_add_up_to_the_whole_completion(client):
    args = dict(model="tiny:ad", prompt="The keeper", max_tokens=10, seed=5)
    chunks = list(client.completions.create(stream=True, **args))
    assert len(chunks) > 2 and chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks) == client.completions.create(**args).choices[0].text


def test_chat_continues_the_script_after_assistant(client):
    messages = [{"role": "system", "content": "A story."}, {"role": "user", "content": "Tell me more."}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, seed=1)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, seed=1, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == r.choices[0].message.content


def test_a_stop_string_ends_the_text_before_it(client):
    whole = client.completions.create(model="tiny", prompt="The", max_tokens=30, temperature=0, seed=0).choices[0].text
    stop = whole[10:12]
    r = client.completions.create(model="tiny", prompt="The", max_tokens=30, temperature=0, seed=0, stop=[stop])
    assert r.choices[0].text == whole[:whole.index(stop)] and r.choices[0].finish_reason == "stop"


def test_an_unknown_model_is_404_in_openais_shape(client):
    for model in ("nope", "gpt-3.5-turbo", "tiny:nope"):
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model=model, prompt="x", max_tokens=2)
        assert e.value.body["code"] == "model_not_found", model


@pytest.mark.parametrize("args, param", [({"temperature": 9.0}, "temperature"), ({"max_tokens": 0}, "max_tokens"),
                                         ({"n": 2}, "n"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
                                         ({"extra_body": {"top_k": "many"}}, "top_k")])
def test_bad_parameters_are_400_naming_the_parameter(client, args, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", **{"max_tokens": 2, **args})
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"


def test_an_untrained_model_is_refused_with_a_reason(client):
    with pytest.raises(openai.ConflictError, match="train it on a book first"):
        client.chat.completions.create(model="fresh", messages=[{"role": "user", "content": "hi"}])


def test_with_an_api_key_only_a_client_that_sends_it_gets_in(home):
    with live(home, api_key="s3cret") as url:
        for key in ("wrong", "s3cret-but-longer"):
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=url, api_key=key, max_retries=0).models.list()
        assert httpx.get(f"{url}/models").status_code == 401  # no Authorization header at all
        assert [m.id for m in openai.OpenAI(base_url=url, api_key="s3cret").models.list()][0] == "tiny"


def test_without_a_key_other_machines_are_refused(home):
    from fastapi.testclient import TestClient

    app = server.create_app(home)
    far = TestClient(app, base_url="http://127.0.0.1", client=("192.168.1.7", 5000))
    near = TestClient(app, base_url="http://127.0.0.1", client=("127.0.0.1", 5000))
    assert far.get("/v1/models").status_code == 403 and near.get("/v1/models").status_code == 200
    assert far.get("/health").status_code == 200  # the rest of the API is as it was


def test_v1_waits_in_the_same_generation_queue_as_generate(home, monkeypatch):
    """Each token is made on a generation thread while the request holds a slot (a stream: until
    its last chunk); with every slot taken, openai's client gets RateLimitError and Retry-After."""
    from fastapi.testclient import TestClient

    app = server.create_app(home)
    queue, seen = app.state.azr.generation, []

    def watched(*args):
        for piece in stream(*args):
            seen.append((threading.current_thread().name, queue.taken))
            yield piece
    monkeypatch.setattr(v1, "stream", watched)
    near = TestClient(app, base_url=LOCAL_URL, client=("127.0.0.1", 5000))
    client = openai.OpenAI(base_url=f"{LOCAL_URL}/v1", api_key="anything", max_retries=0, http_client=near)
    client.completions.create(model="tiny", prompt="The", max_tokens=3)
    list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                        stream=True))
    assert len(seen) >= 2 and all(name.startswith("generate") and taken == 1 for name, taken in seen), seen
    assert queue.taken == 0
    queue.taken = GENERATION_QUEUE  # as if that many requests were generating or waiting
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model="tiny", prompt="The", max_tokens=3)
    assert e.value.response.headers["retry-after"] == str(GENERATION_RETRY_AFTER_S)


def test_a_completion_whose_client_left_stops(home, monkeypatch):
    made = []

    def endless(*args):
        while True:
            time.sleep(0.01)
            made.append(1)
            yield "a", 1, None
    monkeypatch.setattr(v1, "stream", endless)
    with live(home) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/completions", json={"model": "tiny", "prompt": "The"}, timeout=1)
        deadline = time.time() + 10
        while httpx.get(url.replace("/v1", "/health")).json()["generating"]:  # its slot given back
            assert time.time() < deadline, "the generation went on without its client"
            time.sleep(0.05)
        stopped_at = len(made)
        time.sleep(0.3)
    assert made and len(made) == stopped_at


def test_the_server_takes_its_key_from_the_flag_or_the_environment(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(server.uvicorn, "run", lambda app, **kw: seen.update(key=app.state.azr.api_key))
    monkeypatch.setenv("AZR_API_KEY", "from-env")
    server.main(["--home", str(tmp_path)])
    assert seen["key"] == "from-env"
    server.main(["--home", str(tmp_path), "--api-key", "from-flag"])
    assert seen["key"] == "from-flag"
    monkeypatch.delenv("AZR_API_KEY")
    server.main(["--home", str(tmp_path)])
    assert seen["key"] is None


def test_the_readme_snippet_runs(client, capsys):
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("### OpenAI-compatible API")[1].split("\n## ")[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(code.replace("http://127.0.0.1:8000/v1", str(client.base_url)).replace("max_tokens=50", "max_tokens=5"), {})
    assert capsys.readouterr().out.startswith("['tiny', 'tiny:ad']\n")


# ----------------------------------------------------------------------------- the pieces


def test_stop_strings_are_found_and_their_beginnings_held_back():
    assert first_stop("abc\nUser: hi", ["\nUser:", "c"]) == 2
    assert first_stop("abc", ["x"]) is None
    assert stop_prefix_len("the end\nUs", ["\nUser:"]) == 3  # "\nUs" may become "\nUser:"
    assert stop_prefix_len("the end", ["\nUser:"]) == 0
    assert stops_of("x") == ["x"] and stops_of(None) == []


def test_the_chat_script():
    msgs = [Message(role="system", content="A book."), Message(role="user", content=[TextPart(type="text", text="Hi")]),
            Message(role="assistant", content="Hello."), Message(role="user", content="Go on.")]
    assert chat_prompt(msgs) == "A book.\nUser: Hi\nAssistant: Hello.\nUser: Go on.\nAssistant:"

