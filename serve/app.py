"""The HTTP ingress and the app builder.

    serve run serve.app:build_app checkpoint=runs/debug/model [config=serve/serve.toml]
    (runs/debug/model is what jobs.train writes; make demo prints its own, runs/debug/runs/soft/model)
    serve deploy serve/serve.yaml

Endpoints (JSON errors everywhere, OpenAPI at /docs):
    POST   /v1/segment          image (raw body or multipart field "image") -> PNG mask or JSON
    POST   /v1/jobs             {"slide_uri": ...} -> 202, the job
    GET    /v1/jobs/{id}        state, progress, result URIs
    DELETE /v1/jobs/{id}        cancel
    GET    /healthz             the model deployment answers
Metrics: ``foveation.monitoring`` (ray.util.metrics, exported by Ray's metrics agent).
"""

import asyncio
import contextlib
import hmac
import json
import logging
import time
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import TaskCancelledError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from foveation import monitoring
from foveation.serving.errors import RequestError
from foveation.serving.guard import RequestGuard, request_id_of
from foveation.serving.jobstore import JobStore, check_job_id
from foveation.serving.settings import ServeConfig, load_serve_config, serve_config_from_dict
from foveation.serving.uploads import check_content_type, decode_upload
from foveation.serving.uris import check_slide_uri
from serve.deployments import ModelServer, SlideJobRunner

log = logging.getLogger("ray.serve")

api = FastAPI(
    title="Foveation segmentation",
    version="1",
    description="Foveated segmentation of histology images (Jin et al., MICCAI 2020): "
    "synchronous region requests and whole-slide jobs. Errors are "
    '`{"error": {"code", "message", "status", "request_id"}}`; the request id is also the '
    "`X-Request-ID` header of every answer.",
)
api.add_middleware(RequestGuard)  # idle-body timeout and in-flight cap (foveation.serving.guard)

CLIENT_CLOSED = 499
"""Status recorded for a request whose client hung up (nginx's convention): not a server
error, so the 5xx alert does not count it."""

CLIENT_GONE = (ClientDisconnect, asyncio.CancelledError, TaskCancelledError)
"""How a hang-up reaches the routes: Starlette's ``ClientDisconnect`` when the body read sees
it; ``asyncio.CancelledError`` when Serve cancels the request's coroutine; Ray's
``TaskCancelledError`` (``RequestCancelledError`` is one) when the proxy cancels the request
while the ingress waits on a call back to it (reading the body) or on the model."""


def _error(
    request: Request, status: int, code: str, message: str, headers: dict | None = None
) -> JSONResponse:
    body = RequestError(status, code, message).to_dict()
    body["error"]["request_id"] = request_id_of(request.headers)
    return JSONResponse(body, status_code=status, headers=headers)


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
    if exc.status == 503:
        headers = {"Retry-After": str(exc.retry_after_s)}
    if exc.status in (401, 408, 413):
        # The body may be unread (refused before reading it, or stalled): close the
        # connection rather than parse what follows as the next request.
        headers["Connection"] = "close"
    return _error(request, exc.status, exc.code, exc.message, headers or None)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return _error(request, 422, "invalid_request", "; ".join(parts) or "invalid request")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _error(request, exc.status_code, code, str(exc.detail))


@api.exception_handler(ClientDisconnect)
@api.exception_handler(TaskCancelledError)
async def _client_gone(request: Request, _: Exception) -> JSONResponse:
    # Nobody reads this answer; it exists so that the request ends as a 499, not a 500.
    log.info("client closed the connection [%s]", request_id_of(request.headers))
    return _error(request, CLIENT_CLOSED, "client_closed", "the client closed the connection")


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    rid = request_id_of(request.headers)
    log.error("unexpected error [%s]: %s: %s", rid, type(exc).__name__, exc)
    return _error(request, 500, "internal_error", f"internal error; see the server log ({rid})")


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    slide_uri: str = Field(description="a slide under an allowed prefix (path or s3://)")


# Helpers the routes call are defined before the class: serve.ingress pickles the routes
# when the class is decorated.


def _job_request(body: bytes) -> JobRequest:
    """The job request in a JSON body, or a 422 naming what is wrong with it."""
    from pydantic import ValidationError

    try:
        return JobRequest.model_validate_json(body)
    except ValidationError as exc:
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ())) or "body"
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
        raise RequestError(422, "invalid_request", "; ".join(parts)) from None


def _unwrap(result: dict[str, Any]) -> dict[str, Any]:
    if "error" in result:
        e = result["error"]
        raise RequestError(e["status"], e["code"], e["message"])
    return result["ok"]


@contextlib.contextmanager
def _observed(route: str, ok: int):
    """Count and time one request of ``route`` by status however it ends: ``ok``, a
    RequestError's status and code, or 500 for anything else (what the catch-all handler
    answers). A refused request (any 4xx, or 503 when overloaded) also counts as rejected, by
    its error code. Yields the start time."""
    t0, status, reason = time.perf_counter(), ok, None
    try:
        yield t0
    except RequestError as exc:
        status, reason = exc.status, exc.code
        raise
    except CLIENT_GONE:
        status = CLIENT_CLOSED
        raise
    except Exception:
        status = 500
        raise
    finally:
        monitoring.record("foveation_serve_requests_total", route=route, status=status)
        monitoring.record(
            "foveation_serve_request_seconds", time.perf_counter() - t0, route=route, status=status
        )
        if reason is not None and (400 <= status < 500 or status == 503):
            monitoring.record("foveation_serve_rejected_total", route=route, reason=reason)


def _refused(status: int, reason: str) -> None:
    """A request the guard answered itself (the in-flight cap)."""
    monitoring.record("foveation_serve_requests_total", route="*", status=status)
    monitoring.record("foveation_serve_rejected_total", route="*", reason=reason)


def _public(rec: dict[str, Any]) -> dict[str, Any]:
    """A job record as clients see it: its options out, the slide's size and each result's
    download route in."""
    routes = {name: f"/v1/jobs/{rec['id']}/results/{name}" for name in rec.get("results", {})}
    return {k: v for k, v in rec.items() if k != "options"} | {
        "slide": {k: rec.get("options", {}).get(k) for k in ("width", "height")},
        "downloads": routes,
    }


RESULT_TYPES = {"geojson": "application/geo+json"}
"""Content types of a job's results by name; the rest are OME-TIFFs."""


def _result_response(rec, name: str, presign_s: int | None = None):
    """A succeeded job's result ``name`` streamed from the job store (local or S3), or a
    JSON error: 409 while the job has none yet, 404 for a name it does not have. With
    ``presign_s`` and an S3 store, a 307 to a presigned URL instead."""
    from fastapi.responses import RedirectResponse, StreamingResponse

    from foveation.io import storage

    if not rec.results:
        raise RequestError(
            409, "no_results", f"job {rec.id} is {rec.state}: results exist once it succeeded"
        )
    if name not in rec.results:
        raise RequestError(
            404, "unknown_result", f"{name!r}: expected one of {sorted(rec.results)}"
        )
    uri = rec.results[name]
    signed = storage.presigned_url(uri, presign_s) if presign_s else None
    if signed:
        return RedirectResponse(signed, status_code=307)
    filename = uri.rsplit("/", 1)[-1]
    return StreamingResponse(
        storage.read_chunks(uri),
        media_type=RESULT_TYPES.get(name, "image/tiff"),
        headers={
            "Content-Length": str(storage.size(uri)),
            "Content-Disposition": f'attachment; filename="{rec.id}-{filename}"',
        },
    )


def _segment_response(res: dict[str, Any], fmt: str) -> Response:
    from foveation.io.images import encode_png

    mask: np.ndarray = res["mask"]
    names = res["class_names"]
    total = max(1, int(sum(res["counts"])))
    fractions = {n: c / total for n, c in zip(names, res["counts"], strict=True)}
    if fmt == "png":
        return Response(
            encode_png(mask),
            media_type="image/png",
            headers={"X-Class-Fractions": json.dumps(fractions, separators=(",", ":"))},
        )
    body: dict[str, Any] = {
        "width": int(mask.shape[1]),
        "height": int(mask.shape[0]),
        "class_names": names,
        "class_fractions": fractions,
        "pixel_counts": dict(zip(names, res["counts"], strict=True)),
    }
    if res.get("apsm") is not None:
        a = np.asarray(res["apsm"], dtype=np.float32)
        body["apsm"] = {
            "xr_scale": res["xr_scale"],
            "shape": list(a.shape),
            "unit": "px",
            "values": np.round(a, 2).tolist(),
        }
    return JSONResponse(body)


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(
        self, model: DeploymentHandle, runner: DeploymentHandle, settings: dict[str, Any]
    ) -> None:
        from PIL import Image

        self.model, self.runner = model, runner
        self.settings: ServeConfig = serve_config_from_dict(settings)
        self.store = JobStore(self.settings.jobs.store)
        # The token never leaves this process: not in the config, not in a log line.
        self._token = self.settings.auth.read_token().encode()
        limits = self.settings.limits
        RequestGuard.configure(limits.max_in_flight, limits.body_idle_timeout_s, _refused)
        Image.MAX_IMAGE_PIXELS = self.settings.limits.max_pixels  # decompression-bomb guard
        log.info("ingress ready (auth %s)", "on" if self._token else "off")

    # -- helpers -------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if not self._token:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), self._token):
            raise RequestError(401, "unauthorized", "missing or wrong bearer token")

    async def _body(self, request: Request, limit: int) -> bytes:
        """The body, read after the route has checked the token, at most ``limit`` bytes
        (the declared length is checked before a byte is read)."""
        too_large = f"request body over the limit of {limit} bytes for {request.url.path}"
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, "body_too_large", f"{too_large} (declared {declared})")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, "body_too_large", too_large)
            chunks.append(chunk)
        body = b"".join(chunks)
        request._body = body  # Starlette reads the form from here
        return body

    async def _upload(self, request: Request) -> bytes:
        ctype = request.headers.get("content-type", "")
        body = await self._body(request, self.settings.limits.max_body_bytes)
        if not body:
            raise RequestError(400, "empty_body", "the request body is empty; expected an image")
        if ctype.lower().startswith("multipart/form-data"):
            try:
                form = await request.form()
            except Exception as exc:
                raise RequestError(400, "bad_form", f"unreadable multipart body ({exc})") from None
            part = form.get("image")
            if part is None or isinstance(part, str):
                raise RequestError(
                    422, "missing_field", "multipart form: expected a file field 'image'"
                )
            check_content_type(part.content_type)
            data = await part.read()
            if not data:
                raise RequestError(400, "empty_body", "the form's 'image' field is empty")
            return data
        check_content_type(ctype)
        return body

    async def _call(self, call) -> Any:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, WorkerCrashedError
        from ray.serve.exceptions import (
            BackPressureError,
            DeploymentUnavailableError,
            ReplicaUnavailableError,
        )

        try:
            await self._assigned(call)
            return await call
        except (BackPressureError, DeploymentUnavailableError):
            raise RequestError(503, "overloaded", "server busy; retry shortly") from None
        except (
            ActorDiedError,
            ActorUnavailableError,
            WorkerCrashedError,
            ReplicaUnavailableError,
        ) as exc:
            # The replica died under this request (a crash, an OOM kill, a lost node); Serve
            # starts another. Nothing is wrong with the request: say so and let it retry.
            log.warning("replica lost during a request: %s", type(exc).__name__)
            raise RequestError(
                503, "replica_lost", "the model replica restarted during the request; retry"
            ) from None

    async def _assigned(self, call) -> None:
        """Wait at most ``limits.replica_wait_s`` for a replica to take ``call`` (a Serve
        ``DeploymentResponse``); with none alive (its node lost, the autoscaler still adding
        one) Serve would queue it for as long as that lasts. The wait for the work itself is
        not bounded here."""
        assigned = getattr(call, "_fetch_future_result_async", None)  # Ray 2.60's handle
        if assigned is None:
            return
        wait_s = self.settings.limits.replica_wait_s
        try:
            await asyncio.wait_for(asyncio.shield(assigned()), timeout=wait_s)
        except TimeoutError:
            call.cancel()
            log.warning("no replica took a request in %.0f s", wait_s)
            raise RequestError(
                503,
                "no_replica",
                f"no replica is available to take the request (none took it in {wait_s:g} s: "
                "one is starting or its node was lost); retry",
                retry_after_s=max(1, round(wait_s)),
            ) from None

    # -- endpoints -----------------------------------------------------------------------
    @api.get("/healthz", summary="Liveness and readiness: the model deployment answers")
    async def healthz(self) -> JSONResponse:
        try:
            info = await self._call(self.model.info.remote())
        except RequestError:
            return _error(503, "unavailable", "model deployment unavailable")
        return JSONResponse({"status": "ok", "model": info})

    @api.post(
        "/v1/segment",
        summary="Segment an image (PNG, JPEG or TIFF)",
        description="The image as the raw body (Content-Type image/png, image/jpeg or "
        "image/tiff) or as the file field `image` of a multipart form. `format=png` returns "
        "the label mask (8-bit grey, pixel = class id; class fractions in the "
        "X-Class-Fractions header); `format=json` returns class fractions, and the APSM with "
        "`apsm=true`.",
        responses={200: {"content": {"image/png": {}, "application/json": {}}}},
    )
    async def segment(
        self,
        request: Request,
        format: Literal["png", "json"] = Query("png"),
        apsm: bool = Query(False, description="include F's average patch size map (json)"),
    ) -> Response:
        with _observed("/v1/segment", 200) as t0:
            self._authorize(request)
            if apsm and format != "json":
                raise RequestError(422, "invalid_request", "apsm=true needs format=json")
            data = await self._upload(request)
            image = decode_upload(data, self.settings.limits.max_pixels)
            t_model = time.perf_counter()
            res = await self._call(self.model.segment.remote(image, apsm))
            timing = dict(res.get("timing", {}))
            timing["handle"] = time.perf_counter() - t_model
            response = _segment_response(res, format)
            timing["ingress"] = time.perf_counter() - t0
            response.headers["Server-Timing"] = ", ".join(
                f"{k};dur={v * 1000:.2f}" for k, v in timing.items()
            )
            return response

    @api.post(
        "/v1/jobs",
        status_code=202,
        summary="Segment a whole slide as a job",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": JobRequest.model_json_schema()}},
            }
        },
    )
    async def submit_job(self, request: Request) -> JSONResponse:
        with _observed("/v1/jobs", 202):
            self._authorize(request)  # before a byte of the body is read
            job = _job_request(await self._body(request, self.settings.limits.max_job_body_bytes))
            check_slide_uri(job.slide_uri, self.settings.jobs.allowed_prefixes)
            rec = _unwrap(await self._call(self.runner.submit.remote(job.slide_uri)))
            return JSONResponse(
                _public(rec), status_code=202, headers={"Location": f"/v1/jobs/{rec['id']}"}
            )

    @api.get("/v1/jobs/{job_id}", summary="A job's state, progress and result URIs")
    async def get_job(self, request: Request, job_id: str) -> JSONResponse:
        self._authorize(request)
        check_job_id(job_id)
        return JSONResponse(_public(self.store.get(job_id).to_dict()))

    @api.get(
        "/v1/jobs/{job_id}/results/{name}",
        summary="Download one result of a succeeded job (labels, probabilities, apsm, geojson)",
        responses={200: {"content": {"image/tiff": {}, "application/geo+json": {}}}},
    )
    async def get_result(
        self,
        request: Request,
        job_id: str,
        name: str,
        redirect: bool = Query(False, description="S3 store: 307 to a presigned URL"),
    ):
        self._authorize(request)
        check_job_id(job_id)
        presign = self.settings.jobs.presign_s if redirect else None
        return _result_response(self.store.get(job_id), name, presign)

    @api.delete("/v1/jobs/{job_id}", summary="Cancel a queued or running job")
    async def cancel_job(self, request: Request, job_id: str) -> JSONResponse:
        self._authorize(request)
        check_job_id(job_id)
        rec = _unwrap(await self._call(self.runner.cancel.remote(job_id)))
        return JSONResponse(_public(rec), status_code=202)


# ------------------------------------------------------------------------------ the builder


class AppArgs(BaseModel):
    """Typed arguments of :func:`build_app` (``serve run serve.app:build_app key=value ...``
    or the ``args`` of an application in ``serve/serve.yaml``)."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str = Field(description="checkpoint directory (path or s3://)")
    config: str | None = Field(None, description="TOML file with a [serve] table")
    device: str | None = Field(None, description="overrides serve.device")
    settings: dict[str, Any] = Field(
        default_factory=dict, description="nested overrides of the [serve] table"
    )
    name_prefix: str = Field("", description="prefix of the deployment names")


def _check_store(cfg) -> None:
    """The job store must reach every node that runs a replica (``serve.jobs.store``)."""
    import ray

    from foveation.config import ConfigError
    from foveation.raycluster import local_paths_problem

    if cfg.jobs.shared_filesystem or not ray.is_initialized():
        return
    problem = local_paths_problem(
        [("serve.jobs.store", cfg.jobs.store)], "serve.jobs.shared_filesystem"
    )
    if problem:
        raise ConfigError(problem)


def build_app(args: AppArgs) -> serve.Application:
    """The app: Ingress(ModelServer, SlideJobRunner), each with its options from the config.
    Nothing is loaded here: replicas load the checkpoint in their constructors."""
    if isinstance(args, dict):
        args = AppArgs.model_validate(args)
    overrides = dict(args.settings)
    if args.device:
        overrides["device"] = args.device
    cfg = load_serve_config(args.config, overrides)
    _check_store(cfg)
    settings = _settings_dict(cfg)
    p = args.name_prefix
    model = ModelServer.options(
        name=f"{p}ModelServer",
        autoscaling_config=cfg.autoscaling.to_serve(),
        **cfg.model.deployment_options(surge_default=100),
    ).bind(args.checkpoint, settings)
    runner = SlideJobRunner.options(
        name=f"{p}SlideJobRunner", **cfg.runner.deployment_options(surge_default=0)
    ).bind(args.checkpoint, settings)
    return Ingress.options(
        name=f"{p}Ingress", **cfg.ingress.deployment_options(surge_default=100)
    ).bind(model, runner, settings)


def _settings_dict(cfg: ServeConfig) -> dict[str, Any]:
    """The validated settings as plain data for the replicas (they validate them again)."""
    import dataclasses

    from foveation.config import drop_none

    return json.loads(json.dumps(drop_none(dataclasses.asdict(cfg))))


__all__ = ["AppArgs", "Ingress", "api", "build_app"]
