"""The ingress guard's idle-body timeout (``serving.guard``), on plain asyncio queues."""

import asyncio
import time

import pytest

from foveation.serving.errors import RequestError
from foveation.serving.guard import _idle_limited, request_id_of


def _run(coro):
    return asyncio.run(coro)


def test_a_body_that_stops_arriving_is_a_408_after_the_idle_time_not_before():
    async def main():
        q: asyncio.Queue = asyncio.Queue()
        receive = _idle_limited(q.get, 0.3)
        q.put_nowait({"type": "http.request", "body": b"a", "more_body": True})
        assert (await receive())["body"] == b"a"
        t = time.perf_counter()
        with pytest.raises(RequestError) as err:
            await receive()  # nothing more arrives
        return time.perf_counter() - t, err.value

    waited, err = _run(main())
    assert 0.25 <= waited < 1.0
    assert err.status == 408 and err.code == "body_timeout"


def test_a_slow_but_steady_body_and_reads_after_it_are_never_cut_off():
    async def main():
        q: asyncio.Queue = asyncio.Queue()
        receive = _idle_limited(q.get, 0.2)

        async def trickle():
            for i in range(6):  # 6 x 0.1 s: longer than the idle time in all, never idle
                await asyncio.sleep(0.1)
                q.put_nowait({"type": "http.request", "body": b"x", "more_body": i < 5})

        feeder = asyncio.ensure_future(trickle())
        got = b""
        while True:
            m = await receive()
            got += m["body"]
            if not m["more_body"]:
                break
        await feeder
        # once the body is complete, a read waits as long as it takes (a disconnect listener)
        later = asyncio.ensure_future(receive())
        await asyncio.sleep(0.4)
        assert not later.done()
        q.put_nowait({"type": "http.disconnect"})
        return got, await later

    got, last = _run(main())
    assert got == b"xxxxxx" and last["type"] == "http.disconnect"


def test_request_ids_are_quoted_safely():
    assert request_id_of({"x-request-id": "abc-123"}) == "abc-123"
    assert (
        request_id_of({"x-request-id": "a\nb c<script>" + "z" * 100})
        == ("abcscript" + "z" * 100)[:64]
    )
    assert request_id_of({}) == "-"
