"""HTTP side of `fdngx sim`: per replica one aiohttp app on the API port and one on the metrics port.

The routes, status codes and bodies mirror PaddlePaddle/FastDeploy fastdeploy/entrypoints/openai/api_server.py
(see protocol.py for the bodies and tests/fixtures/upstream/README.md for the versions read).

All replicas share one asyncio loop. Each replica runs one stepping task that advances its whole batch at
once and wakes the streams that got a token, so CPU cost grows with tokens, not with timers per request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import logging
import random
import time
from typing import Any

from aiohttp import web

from fdngx.errors import LaunchError, UsageError
from fdngx.sim.config import ReplicaConfig, SimConfig
from fdngx.sim.faults import Faults, validate_fault
from fdngx.sim.introspect import config_info, replica_state
from fdngx.sim.metrics import GARBAGE_METRICS, ReplicaMetrics
from fdngx.sim.model import ReplicaModel, SimRequest
from fdngx.sim.protocol import (
    INTERNAL_ERROR,
    INVALID_REQUEST_ERROR,
    MAX_MODEL_LEN,
    Formatter,
    dumps,
    error_body,
    models_body,
    too_many_requests_body,
)
from fdngx.sim.validation import RequestError, parse_request

log = logging.getLogger("fdngx.sim")

REPLICA_HEADER = "X-Fdngx-Replica"
# Cut open streams quickly on SIGTERM or crash: a simulator has nothing to drain.
SHUTDOWN_TIMEOUT = 0.25


def is_loopback(remote: str | None) -> bool:
    """True for 127.0.0.0/8 and ::1 peers (also IPv4-mapped ones); control endpoints answer only these."""
    try:
        addr = ipaddress.ip_address((remote or "").split("%")[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def _json(obj: Any, status: int = 200) -> web.Response:
    """A starlette JSONResponse: compact JSON."""
    return web.Response(body=dumps(obj), status=status, content_type="application/json")


# The status FastDeploy answers while its model weights are cleared (dynamic weight loading): api_server.py
# `health` (is_workers_alive false: "No model weight enabled") and the completion and models routes
# ({"error": "Worker Service Not Healthy"}). A 304 carries no body on the wire, so neither text arrives.
NOT_MODIFIED = 304


class Replica:
    def __init__(self, rc: ReplicaConfig, sim: SimConfig, on_crash: Any) -> None:
        self.rc = rc
        self.sim = sim
        self.model = ReplicaModel(rc.params, speed=rc.speed, seed=sim.seed * 7919 + rc.index)
        self.metrics = ReplicaMetrics(self.model, legacy=sim.legacy_metrics)
        self.faults = Faults(**sim.faults.as_dict())
        self._rng = random.Random(sim.seed * 7919 + rc.index + 1)
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()
        self._never = asyncio.Event()
        self._on_crash = on_crash
        self.in_flight = 0
        self.hung = 0
        self.rejected = 0
        self.errors = 0
        self.crashed = False
        self.runners: list[web.AppRunner] = []
        self._stepper: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self, host: str) -> None:
        self._stepper = asyncio.create_task(self._step_loop(), name=f"step-{self.rc.port}")
        self._stepper.add_done_callback(self._stepper_done)
        for app, port in ((self._api_app(), self.rc.port), (self._metrics_app(), self.rc.metrics_port)):
            runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT)
            await runner.setup()
            self.runners.append(runner)
            try:
                await web.TCPSite(runner, host, port, reuse_address=True).start()
            except OSError as exc:
                raise LaunchError(f"replica {self.rc.index}: cannot listen on {host}:{port}: {exc.strerror}") from None

    def _stepper_done(self, task: asyncio.Task[None]) -> None:
        # A dead stepper would leave every request hanging without a word: say so loudly.
        if not task.cancelled() and task.exception() is not None:
            log.error("replica %s: engine loop died", self.rc.index, exc_info=task.exception())

    async def stop(self) -> None:
        if self._stepper is not None:
            self._stepper.cancel()
        for runner in self.runners:
            await runner.cleanup()
        self.runners = []

    async def crash(self) -> None:
        if self.crashed:
            return
        self.crashed = True
        log.warning(
            "replica %s: crash fault, closing ports %s and %s", self.rc.index, self.rc.port, self.rc.metrics_port
        )
        await self.stop()
        self._on_crash()

    # -- engine ------------------------------------------------------------------------------------
    async def _step_loop(self) -> None:
        loop = asyncio.get_running_loop()
        model, metrics = self.model, self.metrics
        while True:
            duration = model.begin_step(loop.time())
            if duration is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            await asyncio.sleep(duration)
            progressed = model.end_step(loop.time())
            metrics.on_step(len(progressed))
            for req in progressed:
                if req.generated == 1:
                    metrics.on_first_token(req)
                else:
                    metrics.on_token(req)
                if req.finished is not None:
                    metrics.on_finish(req)
                req.waiter.set()

    # -- API port ----------------------------------------------------------------------------------
    def _api_app(self) -> web.Application:
        metrics = self.metrics

        @web.middleware
        async def http_metrics(request: web.Request, handler: Any) -> web.StreamResponse:
            # metrics_middleware.py PrometheusMiddleware: count and time every non-excluded API request.
            t0 = time.monotonic()
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                metrics.on_http(request.method, request.path, status, time.monotonic() - t0)

        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[http_metrics])
        name = self.rc.name

        async def tag(_request: web.Request, response: web.StreamResponse) -> None:
            response.headers[REPLICA_HEADER] = name

        app.on_response_prepare.append(tag)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._text)
        app.router.add_get("/v1/models", self._models)
        # api_server.py: /health is GET only; /ping (for SageMaker) takes GET and POST and answers as /health.
        app.router.add_get("/health", self._health)
        app.router.add_get("/ping", self._health)
        app.router.add_post("/ping", self._health)
        app.router.add_get("/health_generate", self._health)  # SGLang's gateway probes this one
        for path in ("/get_model_info", "/model_info"):
            app.router.add_get(path, self._model_info)
        for path in ("/get_server_info", "/server_info"):
            app.router.add_get(path, self._server_info)
        app.router.add_get("/get_load", self._get_load)
        return app

    async def _health(self, _request: web.Request) -> web.Response:
        # api_server.py health(): check_health (worker heartbeat) first: 404 with its message; then
        # is_workers_alive (weights loaded): 304.
        if self.faults.unhealthy:
            return web.Response(status=404, text="Worker Service Not Healthy")
        if self.faults.no_weights:
            return web.Response(status=NOT_MODIFIED)
        return web.Response(status=200)

    async def _models(self, _request: web.Request) -> web.Response:
        if self.faults.no_weights:
            return web.Response(status=NOT_MODIFIED)
        return _json(models_body(self.sim.model_name))

    # No model_path or tokenizer_path here or in server_info: SGLang's gateway would try to fetch that
    # tokenizer from the Hugging Face hub, and nothing here may reach outside this machine.
    async def _model_info(self, _request: web.Request) -> web.Response:
        return _json(
            {
                "is_generation": True,
                "model_type": "sim",
                "architectures": ["SimForCausalLM"],
            }
        )

    async def _server_info(self, _request: web.Request) -> web.Response:
        # SGLang's http_server.py get_server_info: server args, then scheduler_info, internal_states (one per DP
        # rank) and version (tests/fixtures/upstream/sglang-server-info.json); the last two keys are the sim's.
        tokens = self.rc.params.kv_blocks * self.rc.params.block_size
        return _json(
            {
                "served_model_name": self.sim.model_name,
                "tp_size": 1,
                "dp_size": 1,
                "max_running_requests": self.rc.max_num_seqs,
                "max_total_tokens": tokens,
                "max_total_num_tokens": tokens,
                "max_req_input_len": MAX_MODEL_LEN - 6,
                "internal_states": [{"last_gen_throughput": 0.0, "memory_usage": {"token_capacity": tokens}}],
                "version": "fdngx-sim",
                "max_batch_size": self.rc.max_num_seqs,
                "load_in_flight": self.in_flight,
            }
        )

    async def _get_load(self, _request: web.Request) -> web.Response:
        # SGLang's shape: one entry per DP rank.
        m = self.model
        return _json(
            [
                {
                    "dp_rank": 0,
                    "num_reqs": m.num_running + m.num_waiting,
                    "num_waiting_reqs": m.num_waiting,
                    "num_tokens": m.used_blocks() * m.params.block_size,
                }
            ]
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._completion(request, chat=True)

    async def _text(self, request: web.Request) -> web.StreamResponse:
        return await self._completion(request, chat=False)

    async def _completion(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        # Order as in api_server.py create_chat_completion: FastAPI validates the body first, then the weights
        # check, then connection_manager() takes the concurrency semaphore or answers 429 at once.
        try:
            parsed = parse_request(await request.read(), chat=chat, default_max_tokens=self.sim.default_max_tokens)
        except RequestError as exc:
            return _json(exc.body, status=exc.status)
        if self.faults.no_weights:
            return web.Response(status=NOT_MODIFIED)
        if self.in_flight >= self.rc.max_concurrency:
            self.rejected += 1
            return _json(too_many_requests_body(self.rc.max_concurrency), status=429)
        if self.faults.error_rate and self._rng.random() < self.faults.error_rate:
            # An engine error answered as the handler's ErrorResponse: HTTP 500, type internal_error.
            self.errors += 1
            msg = f"request[{parsed.request_id}] simulated engine error (fdngx sim error_rate fault)"
            return _json(error_body(msg, INTERNAL_ERROR), status=500)
        self.in_flight += 1
        req: SimRequest | None = None
        try:
            if self.faults.hang:
                self.hung += 1
                try:
                    await self._never.wait()
                finally:
                    self.hung -= 1
            loop = asyncio.get_running_loop()
            req = SimRequest(next(self._ids), parsed.prompt_tokens, parsed.max_tokens, loop.time())
            req.waiter = asyncio.Event()
            # The served model's name, whatever the request asked for (serving_models.py
            # is_supported_model without --served-model-name).
            fmt = Formatter(parsed, self.sim.model_name, salt=req.rid * 7 + self.rc.index)
            self.metrics.on_arrival(req)
            self.model.submit(req)
            self._wake.set()
            if parsed.stream:
                return await self._stream(request, req, fmt)
            while req.finished is None:
                await req.waiter.wait()
                req.waiter.clear()
            return _json(fmt.full_body(req.generated))
        finally:
            self.in_flight -= 1
            if req is not None and not req.done:
                self.model.cancel(req)

    async def _stream(self, request: web.Request, req: SimRequest, fmt: Formatter) -> web.StreamResponse:
        # starlette's StreamingResponse sends the 200 and its headers before the generator yields anything:
        # as soon as the request is in the engine, long before the first token.
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        sent = 0
        while True:
            await req.waiter.wait()
            req.waiter.clear()
            n = req.generated
            if n == sent:
                continue
            # The role chunk goes out with the first token (serving_chat.py, first_iteration).
            head = fmt.first_event() if sent == 0 else b""
            assert req.admitted is not None and req.last_token is not None
            done = req.finished is not None
            body = head + fmt.token_events(sent, n, req.last_token - req.admitted, finished=done)
            sent = n
            if done:
                await resp.write(body + fmt.final_events(n))
                await resp.write_eof()
                return resp
            await resp.write(body)

    # -- metrics port ------------------------------------------------------------------------------
    def _metrics_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/config-info", self._config_info)
        app.router.add_get("/sim/state", self._state)
        app.router.add_post("/sim/fault", self._fault)
        return app

    async def _metrics(self, _request: web.Request) -> web.Response:
        if self.faults.metrics_delay:
            await asyncio.sleep(self.faults.metrics_delay)
        if self.faults.garbage_metrics:
            return web.Response(body=GARBAGE_METRICS, content_type="text/plain")
        # api_server.py metrics(): Response(text, media_type="text/plain"), charset added by starlette.
        return web.Response(body=self.metrics.render(), headers={"Content-Type": "text/plain; charset=utf-8"})

    async def _config_info(self, _request: web.Request) -> web.Response:
        return _json(config_info(self.rc, self.sim, self.model))

    def state(self) -> dict[str, Any]:
        return replica_state(self)

    async def _state(self, request: web.Request) -> web.Response:
        if not is_loopback(request.remote):
            return web.Response(status=403, text="control endpoints answer loopback clients only")
        return _json(self.state())

    async def _fault(self, request: web.Request) -> web.Response:
        if not is_loopback(request.remote):
            return web.Response(status=403, text="control endpoints answer loopback clients only")
        try:
            fault = validate_fault(json.loads(await request.read() or b"null"))
        except ValueError:
            return _json(error_body("fault body is not valid JSON", INVALID_REQUEST_ERROR), status=400)
        except UsageError as exc:
            return _json(error_body(str(exc), INVALID_REQUEST_ERROR, code="invalid_value"), status=400)
        self.apply_fault(fault)
        return _json(self.state())

    def apply_fault(self, fault: dict[str, Any]) -> None:
        for key, value in fault.items():
            if key == "speed":
                self.model.speed = value
            elif key == "crash":
                if value:
                    # Answer the control request first, then drop the sockets.
                    asyncio.get_running_loop().call_later(0.05, lambda: asyncio.ensure_future(self.crash()))
            else:
                setattr(self.faults, key, value)
        log.info("replica %s: faults now %s speed %s", self.rc.index, self.faults.as_dict(), self.model.speed)
