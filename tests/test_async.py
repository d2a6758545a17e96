"""Memoized ``async def`` functions: awaited, cached, stampede-protected without blocking the
event loop."""

from __future__ import annotations

import asyncio
import inspect
import pickle
import time

import pytest

from memoshare import MemoryBackend, memoize


@memoize(MemoryBackend())
async def module_level_double(x):
    return 2 * x


def test_an_async_function_stays_a_coroutine_function_and_is_cached() -> None:
    calls = []

    @memoize(MemoryBackend())
    async def fetch(x, delay=0.0):
        calls.append(x)
        await asyncio.sleep(delay)
        return {"x": x}

    assert inspect.iscoroutinefunction(fetch)

    async def main():  # type: ignore[no-untyped-def]
        return [await fetch(1), await fetch(1), await fetch(x=1), await fetch(2)]

    assert asyncio.run(main()) == [{"x": 1}, {"x": 1}, {"x": 1}, {"x": 2}]
    assert calls == [1, 2]
    assert (fetch.stats.misses, fetch.stats.hits) == (2, 2)
    assert fetch.cache_key(1) == fetch.cache_key(x=1, delay=0.0)
    assert fetch.invalidate(1) is True


def test_concurrent_awaits_compute_once_without_blocking_the_loop(shared_backend) -> None:
    runs = []

    @memoize(shared_backend, shared_stats=False)
    async def slow(x):
        runs.append(x)
        await asyncio.sleep(0.3)
        return x * 10

    async def main():  # type: ignore[no-untyped-def]
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            deadline = time.monotonic() + 0.3
            while time.monotonic() < deadline:
                await asyncio.sleep(0.01)
                ticks += 1

        results, _ = await asyncio.gather(asyncio.gather(*(slow(4) for _ in range(8))), ticker())
        return results, ticks

    results, ticks = asyncio.run(main())
    assert results == [40] * 8
    assert runs == [4]  # one computation; seven waited for it
    assert slow.stats.hits == 7
    assert ticks >= 10  # the loop kept running while the waiters waited


def test_an_async_holder_that_raises_releases_its_waiters() -> None:
    @memoize(MemoryBackend(), shared_stats=False)
    async def fails(x):
        await asyncio.sleep(0.2)
        raise ValueError("boom")

    async def main():  # type: ignore[no-untyped-def]
        return await asyncio.gather(*(fails(1) for _ in range(4)), return_exceptions=True)

    start = time.monotonic()
    outcomes = asyncio.run(main())
    assert all(isinstance(o, ValueError) for o in outcomes)
    assert time.monotonic() - start < 1.0  # not one after another
    assert fails.stats.misses == 4


def test_stochastic_async_functions_keep_running_moments() -> None:
    @memoize(MemoryBackend(), allow_repeated_evaluations=True, min_repetitions=2)
    async def noisy(x):
        return 1.0

    async def main():  # type: ignore[no-untyped-def]
        return [await noisy(0) for _ in range(5)]

    assert asyncio.run(main()) == [1.0] * 5
    assert (noisy.stats.misses, noisy.stats.hits) == (3, 2)


def test_a_module_level_async_function_pickles_by_reference() -> None:
    assert pickle.loads(pickle.dumps(module_level_double)) is module_level_double
    assert asyncio.run(module_level_double(4)) == 8


def test_a_coroutine_function_given_to_memoized_function_directly_is_refused() -> None:
    from memoshare import MemoizedFunction

    async def fetch(x):
        return x

    direct = MemoizedFunction(fetch, backend=MemoryBackend())
    with pytest.raises(TypeError, match="coroutine"):
        direct(1)


class Client:
    """A module-level class: its methods' digests take the class's other members in."""

    @memoize(MemoryBackend(), shared_stats=False)
    async def fetch(self, x):
        return x + 1

    @memoize(MemoryBackend(), shared_stats=False)
    @staticmethod
    async def parse(x):
        return -x

    def helper(self):
        return 0


def test_async_methods_and_static_methods_of_a_module_level_class() -> None:
    async def main():  # type: ignore[no-untyped-def]
        client = Client()
        return [
            await client.fetch(1),
            await client.fetch(1),
            await Client.parse(2),
            await client.parse(2),
        ]

    assert asyncio.run(main()) == [2, 2, -2, -2]
    assert Client.fetch.stats.hits == 1 and Client.parse.stats.hits == 1


def test_a_cancelled_holder_hands_over_to_one_waiter() -> None:
    runs = []

    @memoize(MemoryBackend(), shared_stats=False)
    async def slow(x):
        runs.append(x)
        await asyncio.sleep(0.3)
        return x

    async def main():  # type: ignore[no-untyped-def]
        holder = asyncio.ensure_future(slow(1))
        await asyncio.sleep(0.05)  # the holder computes
        waiters = [asyncio.ensure_future(slow(1)) for _ in range(4)]
        await asyncio.sleep(0.05)
        holder.cancel()
        return await asyncio.gather(*waiters)

    assert asyncio.run(main()) == [1] * 4
    assert len(runs) == 2  # the cancelled holder's run, and exactly one waiter's
