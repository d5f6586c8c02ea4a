"""The OpenAI-compatible ingress (FastAPI behind Serve): auth, limits, templating, routing, errors.

It tokenizes and checks requests itself (so a prompt over the limit costs no model replica time),
then calls the model deployments through their handles. Every error is OpenAI-shaped:
{"error": {"message", "type", "param", "code"}}, the unexpected ones (500) and the ingress' own full queue
(503 with Retry-After) included: `_Guard` wraps the whole app.

A request for an adapter is routed to a generator replica that holds it (Serve model multiplexing, see
`ftray.serve.deployments`); the `x-ftray-replica` header of a generation answer names the replica(s) that made it.
"""


import asyncio
import base64
import contextlib
import hmac
import json
import logging
import struct
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ftray.serve.auth import is_loopback as _loopback
from ftray.serve.auth import load_api_keys, require_keys
from ftray.serve.config import ServeConfig

__all__ = ["APIError", "Ingress", "load_api_keys"]

log = logging.getLogger("ftray.serve")

app = FastAPI(title="ftray", docs_url=None, redoc_url=None)

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    408: "timeout_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": _TYPES.get(self.status, "server_error"), "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@app.exception_handler(APIError)
async def _api_error(request: Request, e: APIError):
    return e.response()


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException):
    return APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", None).response()


class _Admission:
    """The ingress' own queue: `ongoing` requests at once, up to `queued` more waiting (-1: unbounded),
    the rest refused at once with an OpenAI-shaped 503 and Retry-After."""

    def __init__(self, ongoing: int, queued: int, retry_after_s: int):
        self.ongoing, self.queued, self.retry_after_s = ongoing, queued, retry_after_s
        self.slots = asyncio.Semaphore(ongoing)
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self):
        if self.slots.locked():
            if 0 <= self.queued <= self.waiting:
                raise APIError(
                    503, f"the server is at capacity ({self.ongoing} requests in progress, {self.waiting} waiting); "
                    "retry later", "overloaded", headers={"Retry-After": str(self.retry_after_s)},
                )
            self.waiting += 1
            try:
                await self.slots.acquire()
            finally:
                self.waiting -= 1
        else:
            await self.slots.acquire()
        try:
            yield
        finally:
            self.slots.release()


class _Guard:
    """Outermost (pure ASGI, so streams pass through unbuffered): admits each request through
    `app.state.admission` (set by the Ingress replica) and turns an exception that escapes a route into an
    OpenAI-shaped 500 while the response has not started. Starlette's own 500 is plain text."""

    def __init__(self, asgi):
        self.asgi = asgi

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.asgi(scope, receive, send)
        started = False

        async def send_(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        admission = getattr(scope["app"].state, "admission", None) if "app" in scope else None
        try:
            if admission is None or scope["path"].endswith("/healthz"):
                await self.asgi(scope, receive, send_)
            else:
                async with admission.slot():
                    await self.asgi(scope, receive, send_)
        except APIError as e:  # refused by admission: nothing has been sent
            if started:
                raise
            await e.response()(scope, receive, send)
        except ClientDisconnect:  # gone while sending its body: nobody to answer
            return
        except Exception as e:
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if started:  # the status line is out; a stream reports its own errors
                raise
            await APIError(500, f"internal server error ({type(e).__name__}); it is in the server log", "internal_error").response()(
                scope, receive, send
            )


app.add_middleware(_Guard)


# request bodies -------------------------------------------------------------------------------------
class _Req(BaseModel):
    """Every field a request may carry is declared on these models. Any other is refused with a 400 that names
    it (`param`), never ignored: a client that sends `tools` or `response_format` learns that it gets plain text.
    Accepted and unused, because they change nothing in an answer, are only the three fields below."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=200)
    user: str | None = Field(None, max_length=256, description="accepted, unused: an end-user id for the provider's abuse monitoring")
    metadata: dict[str, str] | None = Field(None, description="accepted, unused: tags for a stored completion, and none is stored")
    store: Literal[False] | None = Field(None, description="false only: answers are not kept for later retrieval (`true` is refused)")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, description="a last chunk before [DONE] with `usage` and no choices; the others carry `usage: null`")


_Stop = Annotated[str, Field(min_length=1)]


class _GenReq(_Req):
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="with `stream: true` only")
    seed: int | None = Field(
        None, ge=-(2**63), lt=2**63,
        description="the same seed and settings give the same sampled text, alone or batched with other requests (choice k of n uses seed + k)",
    )
    stop: _Stop | Annotated[list[_Stop], Field(max_length=4)] | None = Field(
        None, description="up to 4 strings: the answer ends where the first of them begins (not included), finish_reason `stop`"
    )
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="subtracted from the logit of each token the answer already has")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="times the token's count in the answer so far, subtracted from its logit")
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=300, description="{token id: bias} added to the logits before the penalties and sampling"
    )


class CompletionRequest(_GenReq):
    prompt: str | list[str] = Field(min_length=1)
    logprobs: int | None = Field(
        None, ge=0, le=5,
        description="per token: the chosen token's log-probability and this many most likely alternatives (the model's own,"
        " before logit_bias, penalties, temperature and top_p: see ftray/serve/sampling.py)",
    )


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]

    def text(self, where: str) -> str:
        if isinstance(self.content, str):
            return self.content
        for k, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}.content.{k}: only text parts are supported", "invalid_value", f"{where}.content.{k}")
        return "".join(p["text"] for p in self.content)


class ChatRequest(_GenReq):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(
        False, description="the chosen tokens' log-probabilities (the model's own, before logit_bias, penalties, temperature and top_p)"
    )
    top_logprobs: int | None = Field(None, ge=0, le=20, description="this many most likely alternatives per token; needs `logprobs: true`")


class EmbeddingRequest(_Req):
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"


class ClassifyRequest(_Req):
    input: str | list[str] = Field(min_length=1)


class RewardItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str | None = None
    response: str | None = None
    messages: list[Message] | None = None

    def payload(self) -> dict:
        if self.messages is not None:
            return {"messages": [{"role": m.role, "content": m.text(f"input.messages.{i}")} for i, m in enumerate(self.messages)]}
        if self.prompt is None or self.response is None:
            raise APIError(400, "each rewards input needs `prompt` and `response`, or `messages`", "invalid_input", "input")
        return {"prompt": self.prompt, "response": self.response}


class RewardRequest(_Req):
    input: list[str | RewardItem] = Field(min_length=1)


class FeedbackRequest(BaseModel):
    # Types are checked by FeedbackStore.handle, so each error names its field in our words.
    model_config = ConfigDict(extra="forbid")
    id: Any = None
    rating: Any = None
    chosen: Any = None
    rejected: Any = None
    comment: Any = None


# helpers ------------------------------------------------------------------------------------------------
def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _union_member(loc_part) -> bool:
    """pydantic names the member of a union it tried in an error's location (`stop.constrained-str`,
    `stop.list[constrained-str]`): not a field."""
    return isinstance(loc_part, str) and (
        loc_part in ("str", "int", "float", "bool") or loc_part.startswith(("constrained-", "list[", "dict[", "function-"))
    )


def _b64(vec: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()


def _token_text(b: bytes) -> str:
    """A token as OpenAI names it in logprobs: its text, or `bytes:\\xNN...` when it is part of a character."""
    try:
        return b.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


def _replicas(outs: list[dict]) -> dict:
    """The `x-ftray-replica` header: the generator replicas that made these answers (n > 1 may use several)."""
    tags = sorted({o["replica"] for o in outs if "replica" in o})
    return {"x-ftray-replica": ",".join(tags)} if tags else {}


def _cancel(resp) -> None:
    """Best effort: Serve's `cancel()` re-raises a call's own failure (e.g. BackPressureError) when it has one."""
    with contextlib.suppress(Exception):
        resp.cancel()


class _SSE(StreamingResponse):
    """Closes its event generator however the response ends, a client gone mid-stream included, so that the
    generator's cleanup (cancelling the model's work) runs now rather than when it is garbage collected."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


@serve.deployment(name="ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict, generators: dict, scorers: dict):
        from ftray.models.load import load_config, load_tokenizer, resolve
        from ftray.serve.registry import AdapterRegistry

        self.cfg = ServeConfig.model_validate(config)
        self.limits = self.cfg.limits
        self.keys = require_keys(self.cfg.auth, None)  # the keys this replica sees; build_app checked the bind
        ing = self.cfg.ingress
        app.state.admission = _Admission(ing.max_ongoing_requests, ing.max_queued_requests, self.limits.retry_after_s)
        self.generators, self.scorers = generators, scorers
        self.kinds = {s.name: s.kind for s in self.cfg.scorers}
        self.route = {g.name: g.route_by_adapter for g in self.cfg.generation}
        self.tok, self.registry, self.ctx, self._templates = {}, {}, {}, {}
        for g in self.cfg.generation:
            r = resolve(g.base, field=f"generation[{g.name}].base")
            self.tok[g.name] = load_tokenizer(r.tokenizer)
            from ftray.data.encode import ensure_chat_template

            ensure_chat_template(self.tok[g.name])
            self.registry[g.name] = AdapterRegistry(g, r.base)
            self.ctx[g.name] = getattr(load_config(r.base), "max_position_embeddings", None)
        self.created = int(time.time())
        self.feedback = None
        if self.cfg.feedback.path:
            from ftray.serve.feedback import FeedbackStore

            self.feedback = FeedbackStore(self.cfg.feedback.path, self.cfg.feedback.remember, self.cfg.feedback.remember_bytes)

    # plumbing ----------------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if not self.keys:
            if not _loopback(request.client.host if request.client else None):
                raise APIError(401, "API keys are required for clients beyond loopback; none are configured", "invalid_api_key")
            return
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise APIError(401, "Missing API key: send `Authorization: Bearer <key>`", "invalid_api_key")
        given = header[7:].strip().encode()
        if not any(hmac.compare_digest(given, k.encode()) for k in self.keys):
            raise APIError(401, "Incorrect API key provided", "invalid_api_key")

    async def _body(self, request: Request, model: type[BaseModel]):
        self._auth(request)
        cap = self.limits.max_body_bytes
        too_big = APIError(413, f"request body exceeds the limit of {cap} bytes", "request_too_large")
        if int(request.headers.get("content-length") or 0) > cap:
            raise too_big
        chunks, size = [], 0
        async for c in request.stream():
            size += len(c)
            if size > cap:
                raise too_big
            chunks.append(c)
        try:
            data = json.loads(b"".join(chunks) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"We could not parse the JSON body of your request: {e}", "invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", "invalid_json")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"] if not _union_member(x))
            if err["type"] == "extra_forbidden":
                raise APIError(400, f"Unrecognized request argument supplied: {where} (this server does not implement it)",
                               "unsupported_parameter", where) from None
            raise APIError(400, f"{where}: {err['msg']}", "invalid_value", where) from None

    def _retry(self) -> dict:
        return {"Retry-After": str(self.limits.retry_after_s)}

    async def _call(self, resp, deadline: float, cancel=None):
        """Await a deployment response within the request's deadline; map Serve failures to 408/429/503.
        `cancel` stops the call on timeout (default: `resp.cancel`)."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        try:
            out = await asyncio.wait_for(resp, max(0.001, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            (cancel or resp.cancel)()
            raise APIError(408, f"request timed out after {self.limits.request_timeout_s:g} s", "request_timeout") from None
        except BackPressureError:
            raise APIError(429, "the model's queue is full; retry later", "overloaded", headers=self._retry()) from None
        except (DeploymentUnavailableError, RayActorError) as e:
            raise APIError(503, f"model replica unavailable ({type(e).__name__}); retry", "unavailable", headers=self._retry()) from None
        if isinstance(out, dict) and "error" in out:
            e = out["error"]
            raise APIError(e.get("status", 500), e["message"], e.get("code"))
        return out

    def _deadline(self) -> float:
        return time.monotonic() + self.limits.request_timeout_s

    async def _route(self, name: str, kind: str) -> tuple[str, str | None]:
        base, _, adapter = name.partition(":")
        if kind == "generation":
            if base not in self.generators:
                other = f" (it is a {self.kinds[base]} model)" if base in self.kinds else ""
                raise APIError(404, f"The model `{name}` does not exist or is not a generation model{other}", "model_not_found", "model")
            if adapter:
                from ftray.serve.registry import AdapterError

                try:  # a miss lists the registry folders (maybe s3://): keep it off the event loop
                    await asyncio.to_thread(self.registry[base].lookup, adapter)
                except AdapterError as e:
                    raise APIError(e.status, str(e), e.code, "model") from None
            return base, adapter or None
        if adapter or self.kinds.get(base) != kind:
            raise APIError(404, f"The model `{name}` does not exist or is not a {kind} model", "model_not_found", "model")
        return base, None

    def _template(self, base: str, adapter: str | None) -> str | None:
        """The adapter run's own chat template when its run folder has tokenizer/, else the base's."""
        if adapter is None:
            return None
        if adapter not in self._templates:
            from ftray import storage
            from ftray.models.load import load_tokenizer

            folder = self.registry[base].lookup(adapter)
            tdir = storage.join(folder.rstrip("/").rsplit("/", 1)[0], "tokenizer")
            tmpl = None
            if storage.exists(storage.join(tdir, "tokenizer_config.json")):
                tmpl = getattr(load_tokenizer(tdir), "chat_template", None)
            self._templates[adapter] = tmpl
        return self._templates[adapter]

    def _encode(self, base: str, text: str, bos: bool) -> list[int]:
        tok = self.tok[base]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return ([tok.bos_token_id] if bos and tok.bos_token_id is not None else []) + ids

    def _gen_reqs(self, body: _GenReq, base: str, adapter: str | None, prompts: list[list[int]], max_tokens: int | None,
                  logprobs: int | None):
        lim = self.limits
        mt = max_tokens or lim.default_max_tokens
        if mt > lim.max_tokens:
            raise APIError(400, f"max_tokens is {mt}, above this server's limit of {lim.max_tokens}", "max_tokens_exceeded", "max_tokens")
        if body.n > lim.max_n:
            raise APIError(400, f"n is {body.n}, above this server's limit of {lim.max_n}", "n_exceeded", "n")
        for ids in prompts:
            if len(ids) > lim.max_prompt_tokens:
                raise APIError(
                    400,
                    f"the prompt has {len(ids)} tokens, above this server's limit of {lim.max_prompt_tokens}",
                    "context_length_exceeded",
                    "messages" if isinstance(body, ChatRequest) else "prompt",
                )
            ctx = self.ctx[base]
            if ctx and len(ids) + mt > ctx:
                raise APIError(400, f"prompt ({len(ids)}) + max_tokens ({mt}) exceeds the context of {ctx} tokens", "context_length_exceeded")
        if body.stream and (body.n > 1 or len(prompts) > 1):
            raise APIError(400, "stream: true supports one prompt and n=1", "invalid_value", "stream")
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", "invalid_value", "stream_options")
        vocab = len(self.tok[base])
        for t in body.logit_bias or {}:
            if not 0 <= t < vocab:
                raise APIError(400, f"logit_bias: token {t} is not in the vocabulary (0-{vocab - 1})", "invalid_value", "logit_bias")
        settings = {
            "max_tokens": mt, "temperature": body.temperature, "top_p": body.top_p, "stop": [body.stop] if isinstance(body.stop, str) else body.stop,
            "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty, "logit_bias": body.logit_bias, "logprobs": logprobs,
        }
        return [
            {"adapter": adapter, "input_ids": ids, **settings, "seed": None if body.seed is None else body.seed + k}
            for ids in prompts
            for k in range(body.n)
        ]

    async def _generate_all(self, base: str, reqs: list[dict]) -> list[dict]:
        """reqs (one adapter) on the generator: routed by the adapter's name to a replica that holds it. A base
        request carries no id, so that any replica answers it: each holds the base, and with an id all base
        traffic would go to the one replica that first served it."""
        deadline = self._deadline()
        adapter = reqs[0]["adapter"]
        h = self.generators[base]
        if adapter and self.route[base]:
            h = h.options(multiplexed_model_id=adapter)
        return await asyncio.gather(*[self._call(h.generate.remote(r), deadline) for r in reqs])

    def _answer(self, base: str, req: dict, out: dict, logprobs) -> tuple[str, str, dict | None]:
        """A whole answer's text (cut at its first stop string), finish_reason, and its tokens' logprobs in the
        shape `logprobs(base, entries, offsets)` gives (None when not asked): as a stream gives them."""
        from ftray.serve.sampling import Decoded

        text = Decoded(self.tok[base], req["stop"])
        if "logprobs" in out:  # token by token: where each one's text begins
            answer = "".join(text.push([t]) for t in out["token_ids"]) + text.flush()
            n = text.ready(final=True)
            lp = logprobs(base, out["logprobs"][:n], text.offsets[:n])
        else:
            answer, lp = text.push(out["token_ids"]) + text.flush(), None
        return answer, "stop" if text.cut is not None else out["finish_reason"], lp

    def _pieces(self, base: str, ids: list[int]) -> list[tuple[str, list[int]]]:
        from ftray.serve.sampling import token_bytes

        return [(_token_text(b), list(b)) for b in (token_bytes(self.tok[base], i) for i in ids)]

    def _chat_logprobs(self, base: str, entries: list, offsets: list[int]) -> dict:
        """OpenAI's chat shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
        content = []
        for chosen, lp, alts in entries:
            (tok, b), *others = self._pieces(base, [chosen, *(i for i, _ in alts)])
            top = [{"token": t, "logprob": a[1], "bytes": ab} for (t, ab), a in zip(others, alts, strict=True)]
            content.append({"token": tok, "logprob": lp, "bytes": b, "top_logprobs": top})
        return {"content": content, "refusal": None}

    def _text_logprobs(self, base: str, entries: list, offsets: list[int]) -> dict:
        """OpenAI's completions shape: tokens, token_logprobs, top_logprobs (the alternatives and the chosen
        token: up to logprobs + 1 entries), text_offset (where each token begins in the answer)."""
        tokens, top = [], []
        for chosen, lp, alts in entries:
            (tok, _), *others = self._pieces(base, [chosen, *(i for i, _ in alts)])
            tokens.append(tok)
            top.append({**{t: a[1] for (t, _), a in zip(others, alts, strict=True)}, tok: lp})
        return {"tokens": tokens, "token_logprobs": [e[1] for e in entries], "top_logprobs": top, "text_offset": list(offsets)}

    async def _stream(self, base: str, req: dict, body: _GenReq, head: dict, choice, on_done=None, logprobs=None) -> StreamingResponse:
        """SSE: each event is `head` (id, object, created, model) with one choice built by
        choice(text, finish, logprobs, first=False); with `stream_options.include_usage` a last event has the usage
        and no choices; the stream ends with [DONE]. Text is cut at the first stop string (a tail that may begin
        one is held back until it is known not to); the tokens' logprobs (`logprobs(base, entries, offsets)`)
        go with the first chunk that carries their text. `on_done(text)` gets the whole answer of a stream that
        finished. The 200 goes out only once a generator replica has taken the request: a full queue (429), no
        replica (503), no slot by the deadline (408) or an adapter it cannot serve answer as such, not as an
        error inside a 200 stream."""
        from ftray.serve.sampling import Decoded

        usage = body.stream_options is not None and body.stream_options.include_usage
        adapter = req.get("adapter")
        routed = {"multiplexed_model_id": adapter} if adapter and self.route[base] else {}  # see _generate_all
        h = self.generators[base].options(stream=True, **routed)
        deadline = self._deadline()
        text = Decoded(self.tok[base], req.get("stop"))
        gen = h.stream.remote(req)
        try:
            admitted = await self._call(gen.__anext__(), deadline, gen.cancel)  # {"admitted": True, "replica"}
        except APIError:  # refused, or timed out (and cancelled): nothing runs upstream
            raise
        except BaseException:  # the client went away meanwhile
            _cancel(gen)
            raise

        def event(c: dict) -> str:
            return _sse({**head, "choices": [c], **({"usage": None} if usage else {})})

        async def events():
            parts: list[str] = []
            entries: list = []
            finished = False
            sent = 0  # tokens whose logprobs are out

            def chunk(new: str, final: bool = False) -> str | None:
                nonlocal sent
                parts.append(new)
                ready = text.ready(final) if logprobs else 0
                lp = logprobs(base, entries[sent:ready], text.offsets[sent:ready]) if ready > sent else None
                sent = max(sent, ready)
                return event(choice(new, None, lp)) if new or lp else None

            yield event(choice(None, None, None, first=True))
            try:
                while True:
                    try:
                        item = await asyncio.wait_for(gen.__anext__(), max(0.001, deadline - time.monotonic()))
                    except StopAsyncIteration:
                        finished = True
                        break
                    if "token_ids" in item:
                        entries += item.get("logprobs") or []
                        out = chunk(text.push(item["token_ids"]))
                        if out:
                            yield out
                    elif "error" in item:
                        finished = True
                        yield _sse({"error": {k: v for k, v in item["error"].items() if k != "status"}})
                        break
                    else:
                        out = chunk(text.flush(), final=True)
                        if out:
                            yield out
                        if on_done is not None:
                            on_done("".join(parts))
                        yield event(choice(None, "stop" if text.cut is not None else item["finish_reason"], None))
                        if usage:
                            yield _sse({**head, "choices": [], "usage": self._usage(item["prompt_tokens"], item["completion_tokens"])})
            except asyncio.TimeoutError:
                yield _sse({"error": {"message": "request timed out", "type": "timeout_error", "code": "request_timeout"}})
            except Exception as e:  # noqa: BLE001 - the status line is sent; say it in the stream
                yield _sse({"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error", "code": None}})
            finally:
                if not finished:  # timed out, failed, or the client went away: free the generator's slot now
                    _cancel(gen)
            yield "data: [DONE]\n\n"

        return _SSE(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", **_replicas([admitted])})

    def _remember(self, rid: str, model: str, messages: list[dict] | None, prompt: str | None):
        """A callback that keeps answers (a text, or a list of choice texts) for `/v1/feedback`."""

        def keep(texts, start: int = 0) -> None:
            if self.feedback is not None:
                self.feedback.remember_completion(rid, model, messages, prompt, [texts] if isinstance(texts, str) else texts, start)

        return keep

    @staticmethod
    def _usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # routes ------------------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    def _model(self, name: str, kind: str, parent: str | None = None) -> dict:
        obj = {"id": name, "object": "model", "created": self.created, "owned_by": "ftray", "kind": kind}
        return {**obj, "parent": parent} if parent else obj

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._auth(request)
        data = []
        for g in self.cfg.generation:
            data.append(self._model(g.name, "generation"))
            names = await asyncio.to_thread(self.registry[g.name].names)
            data += [self._model(f"{g.name}:{a}", "generation", g.name) for a in names]
        data += [self._model(s.name, s.kind) for s in self.cfg.scorers]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id}")
    async def model(self, model_id: str, request: Request) -> dict:
        """One served model or adapter (`base:adapter`), as listed by /v1/models; 404 for any other id."""
        self._auth(request)
        base, _, adapter = model_id.partition(":")
        kind = "generation" if base in self.generators else self.kinds.get(base)
        if kind is None or (adapter and kind != "generation"):
            raise APIError(404, f"The model `{model_id}` does not exist", "model_not_found", "model")
        await self._route(model_id, kind)  # an adapter: in the registry (404), a valid name (400)
        return self._model(model_id, kind, base if adapter else None)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        body = await self._body(request, CompletionRequest)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) > self.limits.max_prompts:  # before tokenizing: each prompt becomes n generations
            raise APIError(
                400, f"prompt has {len(prompts)} entries, above this server's limit of {self.limits.max_prompts}",
                "too_many_prompts", "prompt",
            )
        base, adapter = await self._route(body.model, "generation")
        reqs = self._gen_reqs(body, base, adapter, [self._encode(base, p, bos=True) for p in prompts], body.max_tokens, body.logprobs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
        lp = self._text_logprobs if body.logprobs is not None else None
        if body.stream:
            def choice(text, finish, logprobs, first=False):
                return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": logprobs}

            return await self._stream(base, reqs[0], body, head, choice, self._remember(rid, body.model, None, prompts[0]), lp)
        outs = await self._generate_all(base, reqs)
        answers = [self._answer(base, r, o, lp) for r, o in zip(reqs, outs, strict=True)]
        choices = [{"index": i, "text": t, "finish_reason": f, "logprobs": p} for i, (t, f, p) in enumerate(answers)]
        for j, p in enumerate(prompts):
            self._remember(rid, body.model, None, p)([c["text"] for c in choices[j * body.n : (j + 1) * body.n]], j * body.n)
        prompt_tokens = sum(len(r["input_ids"]) for r in reqs[:: body.n])
        usage = self._usage(prompt_tokens, sum(len(o["token_ids"]) for o in outs))
        return JSONResponse({**head, "choices": choices, "usage": usage}, headers=_replicas(outs))

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        body = await self._body(request, ChatRequest)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "invalid_value", "top_logprobs")
        base, adapter = await self._route(body.model, "generation")
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(f"messages.{i}")} for i, m in enumerate(body.messages)]
        tok = self.tok[base]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, chat_template=self._template(base, adapter))
        top = (body.top_logprobs or 0) if body.logprobs else None
        reqs = self._gen_reqs(body, base, adapter, [self._encode(base, text, bos=False)], body.max_completion_tokens or body.max_tokens, top)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        lp = self._chat_logprobs if body.logprobs else None
        if body.stream:
            head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model}

            def choice(text, finish, logprobs, first=False):
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}

            return await self._stream(base, reqs[0], body, head, choice, self._remember(rid, body.model, msgs, None), lp)
        outs = await self._generate_all(base, reqs)
        answers = [self._answer(base, r, o, lp) for r, o in zip(reqs, outs, strict=True)]
        choices = [
            {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f, "logprobs": p}
            for i, (t, f, p) in enumerate(answers)
        ]
        self._remember(rid, body.model, msgs, None)([c["message"]["content"] for c in choices])
        usage = self._usage(len(reqs[0]["input_ids"]), sum(len(o["token_ids"]) for o in outs))
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": body.model, "choices": choices,
                             "usage": usage}, headers=_replicas(outs))

    def _inputs(self, items: list) -> list:
        if len(items) > self.limits.max_inputs:
            raise APIError(400, f"{len(items)} inputs, above this server's limit of {self.limits.max_inputs}", "too_many_inputs", "input")
        return items

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request):
        body = await self._body(request, EmbeddingRequest)
        base, _ = await self._route(body.model, "embedding")
        texts = self._inputs([body.input] if isinstance(body.input, str) else body.input)
        rows = await self._call(self.scorers[base].embed.remote(texts), self._deadline())
        enc = _b64 if body.encoding_format == "base64" else (lambda v: v)
        data = [{"object": "embedding", "index": i, "embedding": enc(r["embedding"])} for i, r in enumerate(rows)]
        n = sum(r["tokens"] for r in rows)
        return {"object": "list", "data": data, "model": body.model, "usage": {"prompt_tokens": n, "total_tokens": n}}

    @app.post("/v1/classify")
    async def classify(self, request: Request):
        body = await self._body(request, ClassifyRequest)
        base, _ = await self._route(body.model, "classifier")
        texts = self._inputs([body.input] if isinstance(body.input, str) else body.input)
        rows = await self._call(self.scorers[base].classify.remote(texts), self._deadline())
        data = [{"object": "classification", "index": i, "label": r["label"], "score": r["score"], "scores": r["scores"]} for i, r in enumerate(rows)]
        n = sum(r["tokens"] for r in rows)
        return {"object": "list", "data": data, "model": body.model, "usage": {"prompt_tokens": n, "total_tokens": n}}

    @app.post("/v1/rewards")
    async def rewards(self, request: Request):
        body = await self._body(request, RewardRequest)
        base, _ = await self._route(body.model, "reward")
        items = self._inputs([x if isinstance(x, str) else x.payload() for x in body.input])
        rows = await self._call(self.scorers[base].score.remote(items), self._deadline())
        data = [{"object": "reward", "index": i, "score": r["score"]} for i, r in enumerate(rows)]
        n = sum(r["tokens"] for r in rows)
        return {"object": "list", "data": data, "model": body.model, "usage": {"prompt_tokens": n, "total_tokens": n}}

    @app.post("/v1/feedback")
    async def feedback_(self, request: Request):
        """A rating of one answer, or a preferred/rejected pair of answers to one prompt (see serve/feedback.py)."""
        from ftray.serve.feedback import FeedbackError, FeedbackStorageError

        body = await self._body(request, FeedbackRequest)
        if self.feedback is None:
            raise APIError(404, "this server does not collect feedback (no `feedback.path` in its config)", "feedback_off")
        try:
            return await asyncio.to_thread(self.feedback.handle, body.model_dump(exclude_unset=True))
        except FeedbackError as e:
            raise APIError(400, str(e), e.code, e.param) from None
        except FeedbackStorageError as e:
            raise APIError(503, str(e), "feedback_storage_unavailable", headers=self._retry()) from None
