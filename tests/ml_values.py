"""Common ML argument types, built the same way in every process (for the key tests)."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import fractions
import pathlib
import uuid
from typing import Any

import numpy as np


class Color(enum.Enum):
    RED = 1
    GREEN = 2


@dataclasses.dataclass
class Config:
    lr: float
    layers: tuple[int, ...]
    name: str = "x"


Point = collections.namedtuple("Point", "x y")


def make() -> dict[str, Any]:
    import pandas as pd
    import scipy.sparse as sp
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    frame = pd.DataFrame(
        {
            "i": np.arange(5),
            "f": np.linspace(0, 1, 5),
            "s": list("abcde"),
            "c": pd.Categorical(list("xyxyz")),
        }
    )
    return {
        "ndarray": np.arange(12.0).reshape(3, 4),
        "ndarray_fortran": np.asfortranarray(np.arange(12.0).reshape(4, 3)),
        "tensor": torch.arange(6.0).reshape(2, 3),
        "tensor_int": torch.tensor([1, 2, 3]),
        "tensor_bfloat16": torch.ones(3, dtype=torch.bfloat16),
        "tensor_grad": torch.ones(3, requires_grad=True),
        "tensor_strided_view": torch.arange(10.0)[::2],
        "tensor_scalar": torch.tensor(2.5),
        "tensor_sparse": torch.eye(3).to_sparse(),
        "parameter": torch.nn.Parameter(torch.zeros(2)),
        "module": torch.nn.Linear(2, 1).requires_grad_(False).apply(_constant),
        "dataframe": frame,
        "series": frame["f"],
        "series_str": frame["s"],
        "index": pd.Index(["a", "b", "c"]),
        "range_index": pd.RangeIndex(5),
        "csr": sp.csr_matrix(np.eye(4)),
        "coo": sp.coo_matrix(np.eye(3)),
        "estimator": LogisticRegression(C=0.5),
        "pipeline": make_pipeline(StandardScaler(), LogisticRegression()),
        "dataclass": Config(0.1, (1, 2)),
        "enum": Color.GREEN,
        "path": pathlib.Path("/data/train.csv"),
        "pure_path": pathlib.PurePosixPath("a/b"),
        "datetime": datetime.datetime(2024, 1, 2, 3, 4, 5),
        "datetime_tz": datetime.datetime(2024, 1, 2, tzinfo=datetime.timezone.utc),
        "date": datetime.date(2024, 1, 2),
        "timedelta": datetime.timedelta(days=1),
        "decimal": decimal.Decimal("1.5"),
        "fraction": fractions.Fraction(1, 3),
        "uuid": uuid.UUID(int=5),
        "namedtuple": Point(1, 2),
        "set_of_str": {"alpha", "beta", "gamma", "delta"},
        "frozenset": frozenset({"a", "b"}),
        "dict_str_keys": {"b": 1, "a": 2},
        "np_str_array": np.array(["a", "bb"]),
        "np_object_array": np.array(["a", 1], dtype=object),
        "np_datetime": np.array(["2024-01-01"], dtype="datetime64[D]"),
    }


def _constant(module: Any) -> None:
    import torch

    if isinstance(module, torch.nn.Linear):
        module.weight.fill_(0.5)
        module.bias.fill_(0.25)
