"""Caching the samples of a dataset: :class:`CachedDataset` and :class:`CacheLoader`.

A cached dataset is a memoized ``__getitem__``: the sample at index ``i`` of the dataset named
``dataset_name`` is computed once and then served from the store to every epoch, every
DataLoader worker and (with memcached or Redis) every node. It runs on every
:mod:`memoshare.backends` store through the same :class:`~memoshare.client.CacheClient` as
:func:`memoshare.memoize`, and uses :func:`memoshare.stampede.compute_once` so that one caller
computes a missing sample while the others wait for it.

Keys. Every key of a dataset starts with ``<namespace>:ds:<id>:`` where ``<id>`` is 16 hex digits
of a blake2b digest of the canonical encoding of ``(dataset_name, version)``. Then comes
``i<index>`` for a sample of a :class:`CachedDataset`, ``k<32 hex>`` (digest of the key) for an
entry of a :class:`CacheLoader`, or ``manifest``. Names are never pasted into keys, so
``("a", "b_2")`` and ``("a_b", "2")`` are different entries, and a name may hold any character.

Writes. New samples wait in a bounded write buffer (``writer_buffer_size``) and are written in
one ``set_many``. The buffer is flushed when it is full, when its oldest sample is older than
``flush_interval``, on :meth:`~CachedDataset.flush` / close / context-manager exit, at
interpreter exit and when a ``multiprocessing`` child (a DataLoader worker) exits. A sample
waiting in the buffer is served from it, and its stampede lease is held until the sample is in
the store (or dropped, when the store refuses it), so a process waiting for it never computes it
again.
"""

from ..errors import IncompleteCacheError
from . import codec
from .cache import CacheOptions
from .dataset import CachedDataset
from .loader import CacheLoader
from .preload import Preload

__all__ = ["CacheLoader", "CacheOptions", "CachedDataset", "IncompleteCacheError", "Preload"]

# Stored samples name the codec's rebuild functions ``memoshare.datasets._rebuild_array`` and
# ``memoshare.datasets._rebuild_tensor`` (see .codec): they must stay reachable here.
_rebuild_array = codec.rebuild_array
_rebuild_tensor = codec.rebuild_tensor
