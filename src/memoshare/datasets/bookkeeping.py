"""What a cache keeps count of: the health of its store, the bytes it wrote, the indices it saw."""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("memoshare")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - loop always returns


class Sizes:
    """Samples and bytes this process wrote, with a log line every ``log_every`` samples."""

    def __init__(self, name: str, log_every: int | None) -> None:
        self.name = name
        self.log_every = log_every
        self.reset()

    def reset(self) -> None:
        self.samples = 0
        self.bytes = 0
        self.dropped = 0
        self._lock = threading.Lock()

    def add(self, samples: int, nbytes: int) -> None:
        with self._lock:
            before = self.samples
            self.samples += samples
            self.bytes += nbytes
            after, total = self.samples, self.bytes
        every = self.log_every
        if every and after // every > before // every:
            logger.info(
                "memoshare: %s: %d samples cached (%s) by this process",
                self.name,
                after,
                human_bytes(total),
            )

    def add_dropped(self, samples: int) -> None:
        """Count samples dropped from the write buffer (from any thread)."""
        with self._lock:
            self.dropped += samples

    @property
    def mean(self) -> float:
        return self.bytes / self.samples if self.samples else 0.0


class KnownIndices:
    """One bit per index: the samples this process saw in the store (to notice evictions)."""

    def __init__(self, length: int) -> None:
        self.bits = bytearray((length + 7) // 8)

    def add(self, index: int) -> None:
        self.bits[index >> 3] |= 1 << (index & 7)

    def __contains__(self, index: int) -> bool:
        return bool(self.bits[index >> 3] & (1 << (index & 7)))
