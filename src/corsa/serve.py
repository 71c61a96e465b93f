"""`corsa serve`: an OpenAI-compatible HTTP endpoint for an edited model or a store (issue 31).

Models, as `/v1/models` lists them:
  a store   NAME (its current version, whichever that is when a request arrives) and NAME@vK for every
            committed version K (NAME@v0 is the base model); NAME is the store folder's name
  a run     NAME (the adapter, routed as its manifest says) and NAME@base
Every model answers as `corsa ask` does (corsa.loading): an adapter only inside its edits' scope. `/` is a page
for people (corsa.page): a store's versions, what each changed, its facts' answers, and an ask box.

A store is read, never locked: its head moves only inside the transaction that commits a version whose folder was
complete before it (corsa.store), so reading the head on each request picks up an update once it has committed,
and never a half-written one. The first request that names a version not yet loaded loads it (a second or two for
a small model) and the requests behind it wait that long.

Generation runs one request at a time (a CPU model gains nothing from more, and routing keeps per-model caches);
the HTTP side stays concurrent, so clients queue instead of failing.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from corsa import artifacts
from corsa.errors import InputError
from corsa.loading import adapter_folder, adapter_prompt_style, load_edited, load_version
from corsa.page import render, render_run
from corsa.prompts import Formatter
from corsa.scoring import generate
from corsa.store import DB, STORE_FILE, Store

BASE_SUFFIX = "@base"


@dataclass(frozen=True)
class Entry:
    id: str
    created: int  # unix seconds, as OpenAI lists models
    version: int | None  # a store's version; None for a run folder's models


class ServedError(Exception):
    """A request the server refuses, with OpenAI's error fields."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def unix(created: str) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(created).timestamp())
    except ValueError:
        return 0


class Catalog:
    """The models a source offers, and the loaded ones (the `keep` most recently used)."""

    def __init__(self, source: str | Path, keep: int = 3):
        self.source = Path(source)
        self.is_store = (self.source / DB).exists() or (self.source / STORE_FILE).exists()
        self.name = self.source.resolve().name
        if self.is_store:
            Store(self.source).close()  # refused now, with its reason, if it is not a readable store
        else:
            adapter_folder(self.source)  # the same checks as `corsa ask --adapter`, before the server starts
        self.keep = keep
        self.loaded: OrderedDict[tuple[Any, ...], tuple[torch.nn.Module, Formatter]] = OrderedDict()
        self.lock = threading.Lock()

    def entries(self) -> tuple[list[Entry], int | None]:
        """Every model offered now, and a store's head."""
        if not self.is_store:
            made = int((self.source / "adapter_config.json").stat().st_mtime) if (
                self.source / "adapter_config.json").exists() else 0
            return [Entry(self.name, made, None), Entry(self.name + BASE_SUFFIX, made, None)], None
        with Store(self.source) as store:
            versions, head = store.versions(), store.head
        by_number = {v.version: v for v in versions}
        out = [Entry(self.name, unix(by_number[head].created) if head in by_number else 0, head)]
        out += [Entry(f"{self.name}@v{v.version}", unix(v.created), v.version) for v in versions]
        return out, head

    def find(self, model: str) -> Entry:
        entries, _ = self.entries()
        for entry in entries:
            if entry.id == model:
                return entry
        raise ServedError(404, f"The model '{model}' does not exist; GET /v1/models lists "
                          f"{', '.join(e.id for e in entries[:4])}{', ...' if len(entries) > 4 else ''}",
                          param="model", code="model_not_found")

    def model(self, entry: Entry) -> tuple[torch.nn.Module, Formatter]:
        """The loaded model for `entry` (called under `self.lock`)."""
        key: tuple[Any, ...] = ("version", entry.version) if self.is_store else ("run", entry.id)
        if key not in self.loaded:
            if self.is_store:
                self.loaded[key] = load_version(self.source, entry.version)
            elif entry.id.endswith(BASE_SUFFIX):
                from corsa import models

                folder, model_name = adapter_folder(self.source)
                base, tok, _ = models.load_model(model_name)
                self.loaded[key] = (base, Formatter(tok, adapter_prompt_style(folder)))
            else:
                self.loaded[key] = load_edited(self.source)
            while len(self.loaded) > self.keep:
                self.loaded.popitem(last=False)
        self.loaded.move_to_end(key)
        return self.loaded[key]

    def answer(self, model: str, prompts: list[str], max_tokens: int, temperature: float, seed: int
               ) -> tuple[Entry, list[dict[str, Any]]]:
        entry = self.find(model)
        with self.lock:
            served, formatter = self.model(entry)
            room = getattr(getattr(served, "config", None), "max_position_embeddings", None) or 2048
            lengths = [formatter.prompt_length(p) for p in prompts]
            if max(lengths) + max_tokens > room:
                raise ServedError(400, f"the prompt ({max(lengths)} tokens) and max_tokens {max_tokens} do not fit "
                                  f"the model's context ({room} tokens)", param="max_tokens",
                                  code="context_length_exceeded")
            texts = generate(served, formatter, prompts, max_new_tokens=max_tokens, temperature=temperature,
                             seed=seed)
            out = []
            for text, used in zip(texts, lengths):
                n = len(formatter.tokenizer(text, add_special_tokens=False)["input_ids"])
                out.append({"text": text, "prompt_tokens": used, "completion_tokens": n,
                            "finish_reason": "length" if n >= max_tokens else "stop"})
        return entry, out


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields a local model has no use for
    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str | list[str]


def settings(req: Sampling) -> tuple[int, float, int]:
    if req.stream:
        raise ServedError(400, "stream is not supported by corsa serve; ask without it", param="stream")
    return req.max_completion_tokens or req.max_tokens or 64, req.temperature or 0.0, req.seed or 0


def question(messages: list[Message]) -> str:
    """The one question a chat request asks. corsa answers single questions as `corsa ask` does; a system
    prompt or earlier turns would be silently dropped, so they are refused instead."""
    if len(messages) != 1 or messages[0].role != "user":
        raise ServedError(400, "corsa serve answers one user message per request (no system prompt or earlier "
                          "turns): the edits are asked as single questions", param="messages")
    content = messages[0].content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if p.get("type") == "text"]
        if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
            raise ServedError(400, "only text content is supported", param="messages")
        content = "".join(parts)  # type: ignore[arg-type]
    if not content or not content.strip():
        raise ServedError(400, "the user message is empty", param="messages")
    return content


def create_app(source: str | Path, keep: int = 3) -> Any:
    """The ASGI app serving `source` (a store, a run folder or a PEFT adapter folder)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse

    catalog = Catalog(source, keep)
    app = FastAPI(title="corsa", version="1")
    app.state.catalog = catalog

    def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
              code: str | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                            status_code=status)

    @app.exception_handler(ServedError)
    async def refused(_: Request, exc: ServedError) -> JSONResponse:
        return error(exc.status, exc.message, exc.kind, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error(400, f"{where or 'request'}: {first.get('msg', 'malformed request')}", param=where or None)

    @app.exception_handler(InputError)
    async def unusable(_: Request, exc: InputError) -> JSONResponse:
        return error(409, str(exc), kind="conflict")  # e.g. a version whose adapter no longer matches its record

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        if catalog.is_store:
            return render(catalog.source, catalog.name)
        folder, _ = adapter_folder(catalog.source)
        manifest = artifacts.read_manifest(folder) if (folder / artifacts.MANIFEST).exists() else {}
        return render_run(catalog.name, manifest.get("edits") or [])

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        entries, _ = catalog.entries()
        return {"object": "list", "data": [{"id": e.id, "object": "model", "created": e.created,
                                            "owned_by": "corsa"} for e in entries]}

    def fingerprint(entry: Entry) -> str:
        return f"corsa-v{entry.version}" if entry.version is not None else "corsa"

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest) -> dict[str, Any]:
        max_tokens, temperature, seed = settings(req)
        entry, (out,) = catalog.answer(req.model, [question(req.messages)], max_tokens, temperature, seed)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": entry.id, "system_fingerprint": fingerprint(entry),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                             "finish_reason": out["finish_reason"], "logprobs": None}],
                "usage": usage([out])}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest) -> dict[str, Any]:
        max_tokens, temperature, seed = settings(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts or any(not p.strip() for p in prompts):
            raise ServedError(400, "every prompt must be non-empty text", param="prompt")
        entry, outs = catalog.answer(req.model, prompts, max_tokens, temperature, seed)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": entry.id, "system_fingerprint": fingerprint(entry),
                "choices": [{"index": i, "text": o["text"], "finish_reason": o["finish_reason"], "logprobs": None}
                            for i, o in enumerate(outs)],
                "usage": usage(outs)}

    return app


def usage(outs: list[dict[str, Any]]) -> dict[str, int]:
    prompt = sum(o["prompt_tokens"] for o in outs)
    completion = sum(o["completion_tokens"] for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def check_listen(host: str, port: int) -> None:
    """Refuse, before loading anything, an address this machine cannot listen on."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InputError(f"cannot listen on {host}: {exc.strerror}", field="--host") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}", field="--port") from None


def serve(source: str | Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    check_listen(host, port)
    app = create_app(source)
    print(f"corsa serve: {source} at http://{host}:{port}/v1 (models: GET /v1/models)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
