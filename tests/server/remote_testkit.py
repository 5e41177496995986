"""Real `transformers serve` processes for the remote engine's tests (not tests themselves).

The server runs on the tiny model, found the way a production server finds models: in a
Hugging Face cache (a private one, `HF_HUB_CACHE`, offline), under repository names. Each name
there is a model the server serves by name and lists in `GET /v1/models`, like the adapters of
a vLLM server, so the engine's versions can be checked for real:

- `flywheel/tiny`: the tiny random Llama with SmolLM2's real tokenizer (tests/support).
- `flywheel/tiny-terse`: the same shapes rewired so that, whatever it is asked, it answers
  `TERSE_ANSWER` and ends its turn with <|im_end|>: the one deterministic way to see a real
  "stop" (a random model rarely picks its end-of-turn token).

Each process listens on a port it picks itself (`--port 0`; the port is read from its log), so
parallel test sessions never collide, and is stopped by its own pid.

TGI itself cannot run here; `tgi_wire_app` speaks its wire format for the engine's TGI flavour.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

BASE_REPO = "flywheel/tiny"
TERSE_REPO = "flywheel/tiny-terse"
TERSE_ANSWER = "Paris"
_REVISION = "0" * 40  # any commit hash: the cache only needs refs/main to name a snapshot
_STARTED = re.compile(r"Uvicorn running on (http://\S+)")
# Uvicorn's access line for each chat request, written at info (transformers serve's own line per
# request changed between releases, and since 5.25 it is off unless asked for).
_CHAT_REQUEST_LOGGED = re.compile(r'"POST /v1/chat/completions HTTP/1\.[01]"')


def build_hub_cache(root: Path, tiny_model_dir: Path) -> Path:
    """A Hugging Face cache at `root` holding BASE_REPO and TERSE_REPO; returns `root`."""
    base = _snapshot_dir(root, BASE_REPO)
    for file in Path(tiny_model_dir).iterdir():
        (base / file.name).symlink_to(file.resolve())
    _build_terse_model(Path(tiny_model_dir), _snapshot_dir(root, TERSE_REPO))
    return root


def _snapshot_dir(root: Path, repo: str) -> Path:
    repo_dir = Path(root) / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(_REVISION)
    snapshot = repo_dir / "snapshots" / _REVISION
    snapshot.mkdir(parents=True)
    return snapshot


def _build_terse_model(tiny_model_dir: Path, target: Path) -> None:
    """The tiny model made to answer TERSE_ANSWER then <|im_end|>, whatever the prompt.

    Every layer's output projections are zeroed, so the last position's hidden state is just
    the embedding of the last input token. Two embedding dimensions carry the whole program:
    `ALWAYS` is 1 for every token, `AFTER_PROMPT` is 1 only for the token the chat template's
    generation prompt ends with. The final norm keeps only those two, and an untied output
    layer maps AFTER_PROMPT to TERSE_ANSWER (strongly) and ALWAYS to <|im_end|> (weakly): after
    the prompt the answer wins, after the answer only the end of turn is left.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.prompt import render

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    prompt_end = render(tokenizer, [{"role": "user", "content": "hi"}])[-1]
    (answer,) = tokenizer.encode(TERSE_ANSWER, add_special_tokens=False)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    always, after_prompt = 0, 1

    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = model.model.embed_tokens.weight
        embeddings[:, always] = 1.0
        embeddings[:, after_prompt] = 0.0
        embeddings[prompt_end, after_prompt] = 1.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[[always, after_prompt]] = 1.0
        head = torch.zeros_like(embeddings)
        head[answer, after_prompt] = 10.0
        head[end_of_turn, always] = 1.0
    model.config.tie_word_embeddings = False
    model.lm_head = torch.nn.Linear(head.shape[1], head.shape[0], bias=False)
    model.lm_head.weight = torch.nn.Parameter(head)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


@dataclass
class ServeProcess:
    """A running `transformers serve`; `url` is its base URL (no /v1)."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def chat_requests_received(self) -> int:
        """How many chat requests the server itself says it received (from its own log)."""
        return len(_CHAT_REQUEST_LOGGED.findall(self.log_path.read_text(errors="replace")))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


def launch_transformers_serve(hub_cache: Path, log_path: Path) -> ServeLaunch:
    """Start `transformers serve` on CPU over `hub_cache`; `.wait_ready()` waits until it answers
    (so several servers can start at once)."""
    cli = Path(sys.executable).with_name("transformers")
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HUB_OFFLINE": "1",  # nothing may be downloaded: every model is in hub_cache
        "TRANSFORMERS_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",  # the test machine's few cores are shared
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [
        str(cli), "serve",
        "--host", "127.0.0.1", "--port", "0",
        "--device", "cpu",
        "--model-timeout", "-1",  # never unload a model between tests
        "--default-seed", "0",
        "--log-level", "info",  # uvicorn's access lines count the requests (chat_requests_received)
    ]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    return ServeLaunch(process, Path(log_path))


@dataclass
class ServeLaunch:
    process: subprocess.Popen
    log_path: Path
    ready: ServeProcess | None = None

    def wait_ready(self, timeout_s: float = 180) -> ServeProcess:
        """The running server once /health answers (raises with its log if it does not)."""
        if self.ready is not None:
            return self.ready
        deadline = time.monotonic() + timeout_s
        url = None
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"transformers serve exited with {self.process.returncode}:\n{self._log_tail()}")
                if url is None:
                    found = _STARTED.search(self.log_path.read_text(errors="replace"))
                    url = found.group(1) if found else None
                if url is not None and _answers(url):
                    # The first listing scans the cache and imports the model registry (seconds
                    # on a busy machine): done here, not inside a test's timing.
                    httpx.get(f"{url}/v1/models", timeout=60).raise_for_status()
                    self.ready = ServeProcess(url=url, process=self.process, log_path=self.log_path)
                    return self.ready
                time.sleep(0.2)
            raise TimeoutError(f"transformers serve did not answer /health within {timeout_s:.0f} s:\n{self._log_tail()}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        ServeProcess("", self.process, self.log_path).stop()

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@contextmanager
def blue_and_green(tiny_model_dir: Path, tmp_path_factory) -> Iterator[dict[str, ServeLaunch]]:
    """Two `transformers serve` processes ("blue", "green") over one hub cache, for blue/green.
    Both start together and the models they serve are written while they boot (they read them
    on first use); callers `wait_ready()` for the ones they use. Both are stopped at the end."""
    hub_cache = tmp_path_factory.mktemp("hub")
    launches = {
        color: launch_transformers_serve(hub_cache, tmp_path_factory.mktemp(color) / "serve.log")
        for color in ("blue", "green")
    }
    try:
        build_hub_cache(hub_cache, tiny_model_dir)
        yield launches
    finally:
        for launch in launches.values():
            launch.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# ---------------------------------------------------------------------- TGI's wire format


def tgi_wire_app(tokenizer, *, max_total_tokens: int = 512) -> tuple[Any, list[dict]]:
    """An app speaking TGI's `POST /` streaming wire format (SSE `data:` events of
    TextGenerationStreamOutput, `details` on the last one, errors as `{"error", "error_type"}`
    with HTTP 422), answering TERSE_ANSWER then <|im_end|>. No TGI server can run here (it needs
    its Rust router and a GPU build), so this checks the engine's TGI flavour against the wire
    format and TGI's own validation rules, not against TGI itself. Returns the app and the list
    every request body is appended to."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()
    received: list[dict] = []
    answer_id = tokenizer.encode(TERSE_ANSWER, add_special_tokens=False)[0]
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")

    @app.get("/health")
    def health() -> dict:
        return {}

    @app.post("/")
    def generate(body: dict):
        received.append(body)
        parameters = body.get("parameters") or {}
        input_length = len(tokenizer.encode(body["inputs"], add_special_tokens=False))
        max_new_tokens = parameters.get("max_new_tokens") or 20
        # TGI's validation, worded as TGI words it.
        if parameters.get("temperature") is not None and parameters["temperature"] <= 0:
            return _tgi_error("`temperature` must be strictly positive")
        if parameters.get("top_p") is not None and not 0 < parameters["top_p"] < 1:
            return _tgi_error("`top_p` must be > 0.0 and < 1.0")
        if input_length + max_new_tokens > max_total_tokens:  # TGI's --max-total-tokens
            return _tgi_error(f"`inputs` tokens + `max_new_tokens` must be <= {max_total_tokens}. Given: {input_length} "
                              f"`inputs` tokens and {max_new_tokens} `max_new_tokens`")
        tokens = [(answer_id, TERSE_ANSWER, False), (end_id, "<|im_end|>", True)][:max_new_tokens]
        finish = "eos_token" if len(tokens) == 2 else "length"

        def events():
            for index, (token_id, text, special) in enumerate(tokens, start=1):
                last = index == len(tokens)
                event = {
                    "index": index,
                    "token": {"id": token_id, "text": text, "logprob": -0.1, "special": special},
                    "generated_text": TERSE_ANSWER if last else None,
                    "details": {"finish_reason": finish, "generated_tokens": len(tokens),
                                "input_length": input_length, "seed": None} if last else None,
                }
                yield f"data:{json.dumps(event)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app, received


def _tgi_error(message: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message, "error_type": "validation"}, status_code=422)


@asynccontextmanager
async def serve_app(app: Any, port: int = 0) -> AsyncIterator[str]:
    """`app` on uvicorn in this event loop, on `port` (0: a free one); yields its base URL."""
    from support.asgi import serve_asgi

    async with serve_asgi(app, port=port, lifespan="off") as url:
        yield url


# ---------------------------------------------------------------------- vLLM's runtime LoRA API


class FakeVllm:
    """An app speaking the part of vLLM's OpenAI server that runtime LoRA loading uses (vLLM
    needs a GPU build and cannot run on these machines, so this checks the server against
    vLLM's wire format and rules, not against vLLM itself):

    - `GET /health`, `GET /v1/models` (the base model, then every loaded adapter with its path
      as `root` and the base as `parent`);
    - `POST /v1/load_lora_adapter` {"lora_name", "lora_path"}: 200 with a plain-text success
      line; 400 "has already been loaded" for a name it has; 404 when no adapter_config.json
      is at the path; loads of one name take turns, as vLLM's per-name lock makes them. Only
      with `runtime_updating` (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING): otherwise neither
      route exists (FastAPI's 404 "Not Found", as vLLM answers then);
    - `POST /v1/unload_lora_adapter` {"lora_name"}: 200, or 404 for a name it does not have;
    - `POST /v1/chat/completions` with `stream`: 404 "does not exist" for a model it does not
      serve, else SSE chunks of "<model> says hello ..." (one word a chunk, `token_delay_s`
      apart), the finish reason, and the usage chunk when `stream_options.include_usage`.

    Errors have vLLM's shape ({"error": {"message", "type", "param", "code"}}). `calls` records
    every POST as (route, body), in order; `refuse[name] = (status, message)` makes a load
    fail as vLLM would (a rank over --max-lora-rank, no memory left). `seen_as(path)` maps a
    path as the engine sees it to this machine's (the engine's mount of the checkpoints).
    """

    ANSWER = ("says", "hello", "from", "the", "fake", "engine", "and", "keeps", "talking")

    def __init__(self, base_model: str, *, runtime_updating: bool = True, seen_as=lambda path: Path(path),
                 load_delay_s: float = 0.0, token_delay_s: float = 0.0):
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

        self.base_model = base_model
        self.adapters: dict[str, str] = {}
        self.calls: list[tuple[str, dict]] = []
        self.refuse: dict[str, tuple[int, str]] = {}
        self.token_delay_s = token_delay_s
        self._locks: dict[str, asyncio.Lock] = {}
        app = self.app = FastAPI()

        def error(status: int, message: str, kind: str) -> JSONResponse:
            return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}},
                                status_code=status)

        @app.get("/health")
        def health() -> dict:
            return {}

        @app.get("/v1/models")
        def models() -> dict:
            cards = [{"id": base_model, "object": "model", "owned_by": "vllm", "max_model_len": 2048,
                      "root": f"/models/{base_model}", "parent": None}]
            cards += [{"id": name, "object": "model", "owned_by": "vllm", "root": path, "parent": base_model}
                      for name, path in self.adapters.items()]
            return {"object": "list", "data": cards}

        if runtime_updating:
            @app.post("/v1/load_lora_adapter")
            async def load(body: dict):
                self.calls.append(("load", body))
                name, path = body.get("lora_name"), body.get("lora_path")
                if not name or not path:
                    return error(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
                async with self._locks.setdefault(name, asyncio.Lock()):
                    if name in self.adapters:
                        return error(400, f"The lora adapter '{name}' has already been loaded. If you want to "
                                     "load the adapter in place, set 'load_inplace' to True.", "InvalidUserInput")
                    if name in self.refuse:
                        status, message = self.refuse[name]
                        return error(status, message, "BadRequestError")
                    if not (seen_as(path) / "adapter_config.json").is_file():
                        return error(404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError")
                    await asyncio.sleep(load_delay_s)  # reading the weights
                    self.adapters[name] = path
                return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

            @app.post("/v1/unload_lora_adapter")
            async def unload(body: dict):
                self.calls.append(("unload", body))
                name = body.get("lora_name")
                if name not in self.adapters:
                    return error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
                del self.adapters[name]
                return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

        @app.post("/v1/chat/completions")
        async def chat(body: dict):
            self.calls.append(("chat", body))
            model = body.get("model")
            if model != base_model and model not in self.adapters:
                return error(404, f"The model `{model}` does not exist.", "NotFoundError")
            words = [model, *self.ANSWER][: body.get("max_tokens") or 16]
            finish = "stop" if len(words) == 1 + len(self.ANSWER) else "length"

            async def events():
                def chunk(delta: dict, reason: str | None) -> str:
                    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
                    return "data: " + json.dumps({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                                                  "created": 0, "model": model, "choices": [choice]}) + "\n\n"

                for index, word in enumerate(words):
                    await asyncio.sleep(self.token_delay_s)
                    yield chunk({"role": "assistant", "content": (" " if index else "") + word}, None)
                yield chunk({}, finish)
                if (body.get("stream_options") or {}).get("include_usage"):
                    usage = {"prompt_tokens": 10, "completion_tokens": len(words), "total_tokens": 10 + len(words)}
                    yield "data: " + json.dumps({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                                                 "created": 0, "model": model, "choices": [], "usage": usage}) + "\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

    def routes_called(self) -> list[tuple[str, str | None]]:
        """(route, the name it was about) for every POST, in order."""
        return [(route, body.get("lora_name") or body.get("model")) for route, body in self.calls]
