"""How the ingress counts a request whose client hung up: 499, never 500, however Ray
surfaces the hang-up (no Ray session: outside Ray the metrics go to prometheus_client)."""

import asyncio

import pytest
from metrics_helpers import recorded
from ray.exceptions import TaskCancelledError
from ray.serve.exceptions import RequestCancelledError
from starlette.requests import ClientDisconnect


def _count(route: str, status: int) -> float:
    return recorded("foveation_serve_requests_total", route=route, status=str(status))


@pytest.mark.parametrize(
    "exc",
    [ClientDisconnect(), asyncio.CancelledError(), TaskCancelledError(), RequestCancelledError()],
    ids=lambda e: type(e).__name__,
)
def test_a_hang_up_is_counted_as_499_whichever_way_it_arrives(exc):
    from serve.app import CLIENT_CLOSED, _observed

    route = f"test-{type(exc).__name__}"
    with pytest.raises(type(exc)), _observed(route, ok=200):
        raise exc
    assert _count(route, CLIENT_CLOSED) == 1.0
    assert _count(route, 500) == 0.0


def test_any_other_failure_is_a_500_and_a_hang_up_has_its_own_handler():
    from serve.app import _client_gone, _observed, api

    with pytest.raises(RuntimeError), _observed("test-boom", ok=200):
        raise RuntimeError("boom")
    assert _count("test-boom", 500) == 1.0
    # the proxy's cancel reaches the exception handlers as a TaskCancelledError (an Exception):
    # it must meet the hang-up handler, not the catch-all 500
    assert api.exception_handlers[TaskCancelledError] is _client_gone
    assert api.exception_handlers[ClientDisconnect] is _client_gone
