"""Bad input gets a clear error where it is given (decoration, construction), never a silent
uncached run or an obscure error at call time."""

from __future__ import annotations

import pytest

from memoshare import MemcachedBackend, MemoryBackend, memoize


def test_a_backend_class_instead_of_an_instance_is_refused() -> None:
    with pytest.raises(TypeError, match=r"MemoryBackend\(\)"):
        memoize(MemoryBackend)
    with pytest.raises(TypeError, match=r"pass an instance"):
        memoize(backend=MemoryBackend)(lambda x: x)


@pytest.mark.parametrize(
    "server",
    [
        "a:1,b:2",
        "a:1 b:2",
        "redis://h:6379",
        "http://h:11211/",
        "h",
        "h:port",
        ("h", "port"),
        ("h", -1),
        ("h", 70000),
        ("", 11211),
        ("h", True),
    ],
)
def test_bad_memcached_servers_are_refused_at_construction(server) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="memcached"):
        MemcachedBackend(server)


@pytest.mark.parametrize(
    ("server", "parsed"),
    [
        ("memcached://127.0.0.1:11211", ("127.0.0.1", 11211)),
        ("127.0.0.1:11211", ("127.0.0.1", 11211)),
        (("127.0.0.1", "11211"), ("127.0.0.1", 11211)),  # a port as a string, as Bagua writes it
        ("[::1]:11211", ("::1", 11211)),
    ],
)
def test_memcached_server_spellings(server, parsed) -> None:  # type: ignore[no-untyped-def]
    assert MemcachedBackend(server).servers == [parsed]


def test_bad_redis_urls_and_ports_are_refused_at_construction() -> None:
    from memoshare.backends.redis import RedisBackend

    with pytest.raises(ValueError, match="redis://"):
        RedisBackend(url="127.0.0.1:6379")
    with pytest.raises(ValueError, match="port"):
        RedisBackend(port="six")
    assert RedisBackend(port="6390").port == 6390


def test_generator_functions_are_refused_at_decoration() -> None:
    def numbers(n):
        yield from range(n)

    async def stream(n):
        yield n

    for fn in (numbers, stream):
        with pytest.raises(TypeError, match="generator"):
            memoize(MemoryBackend())(fn)


def test_memoize_over_staticmethod_works_like_the_staticmethod() -> None:
    calls = []

    class Scaler:
        @memoize(MemoryBackend())
        @staticmethod
        def double(x):
            calls.append(x)
            return 2 * x

    assert Scaler.double(3) == 6
    assert Scaler().double(3) == 6  # not bound to the instance
    assert Scaler().double(x=3) == 6
    assert calls == [3]
    assert Scaler.double.stats.hits == 2
