"""Ali-CCP and AliExpress, the two CTR/CVR sets, in torch-rechub's CSV format.

Both come preprocessed: sparse columns hold ids that are already encoded, dense
columns hold normalised floats. Only small samples are at hand in this project; the
loaders read the full files the same way, from a folder or from explicit paths.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ._split import Dataset, tabular_split

ALI_CCP_SPARSE = [
    "101",
    "121",
    "122",
    "124",
    "125",
    "126",
    "127",
    "128",
    "129",
    "205",
    "206",
    "207",
    "210",
    "216",
    "508",
    "509",
    "702",
    "853",
    "301",
    "109_14",
    "110_14",
    "127_14",
    "150_14",
]
ALI_CCP_DENSE = [
    "D109_14",
    "D110_14",
    "D127_14",
    "D150_14",
    "D508",
    "D509",
    "D702",
    "D853",
]
ALI_CCP_LABELS = {"ctr": "click", "cvr": "purchase"}

ALIEXPRESS_SPARSE = [f"categorical_{i}" for i in range(1, 17)]
ALIEXPRESS_DENSE = [f"numerical_{i}" for i in range(1, 64)]
ALIEXPRESS_LABELS = {"ctr": "click", "cvr": "conversion"}

TASKS = {"ctr": "binary", "cvr": "binary"}

PathLike = str | Path


def ali_ccp(
    root: PathLike | None = None,
    *,
    train: PathLike | None = None,
    val: PathLike | None = None,
    test: PathLike | None = None,
) -> Dataset:
    """Load Ali-CCP in torch-rechub's format: tasks ``ctr`` (click), ``cvr`` (purchase).

    Files are found in ``root`` as ``ali_ccp_{train,val,test}*.csv`` (the full
    ``ali_ccp_train.csv`` or the ``ali_ccp_train_sample.csv`` sample; a name without
    ``sample`` wins when both are there), or given one by one with ``train=``,
    ``val=`` and ``test=``, which take precedence over ``root``.

    Args:
        root: Folder holding the three files.
        train: Path of the train file.
        val: Path of the validation file.
        test: Path of the test file.

    Returns:
        The data set: the 23 encoded sparse columns with vocabulary size = the
        largest id over the three files + 1, the 8 ``D*`` dense columns.

    Raises:
        InputError: The folder, a file or a column is missing, a label is not 0/1, or
            an id is negative.
    """
    paths = {
        part: given or _find_file(root, "Ali-CCP", [f"ali_ccp_{part}*.csv"])
        for part, given in (("train", train), ("val", val), ("test", test))
    }
    labels = list(ALI_CCP_LABELS.values())
    frames = {
        part: _read_table(path, labels, ALI_CCP_SPARSE, ALI_CCP_DENSE, "Ali-CCP")
        for part, path in paths.items()
    }
    return _tabular_dataset(frames, ALI_CCP_SPARSE, ALI_CCP_DENSE, ALI_CCP_LABELS)


def aliexpress(
    root: PathLike | None = None,
    *,
    train: PathLike | None = None,
    val: PathLike | None = None,
    test: PathLike | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Dataset:
    """Load AliExpress in torch-rechub's format: tasks ``ctr`` and ``cvr`` (conversion).

    Files are found in ``root`` as ``*train*.csv`` and ``*test*.csv`` (the full
    ``train.csv``/``test.csv`` or the ``aliexpress_{train,test}_sample.csv`` samples;
    a name without ``sample`` wins when both are there), or given with ``train=`` and
    ``test=``. The data set has no validation file: without ``val=``, a seeded
    ``val_fraction`` of the train rows becomes the validation part. ``search_id`` is
    dropped.

    Args:
        root: Folder holding the files.
        train: Path of the train file.
        val: Path of a validation file; when given, train is not split.
        test: Path of the test file.
        val_fraction: Share of the train rows taken for validation.
        seed: Seed of that draw.

    Returns:
        The data set: ``categorical_1..16`` sparse with vocabulary size = the largest
        id over the files + 1, ``numerical_1..63`` dense.

    Raises:
        InputError: The folder, a file or a column is missing, a label is not 0/1, or
            an id is negative.
    """
    paths = {
        "train": train or _find_file(root, "AliExpress", ["*train*.csv"]),
        "test": test or _find_file(root, "AliExpress", ["*test*.csv"]),
    }
    if val is not None:
        paths["val"] = val
    labels = list(ALIEXPRESS_LABELS.values())
    frames = {
        part: _read_table(
            path, labels, ALIEXPRESS_SPARSE, ALIEXPRESS_DENSE, "AliExpress"
        )
        for part, path in paths.items()
    }
    if val is None:
        frames["train"], frames["val"] = _hold_out(frames["train"], val_fraction, seed)
    return _tabular_dataset(
        frames, ALIEXPRESS_SPARSE, ALIEXPRESS_DENSE, ALIEXPRESS_LABELS
    )


def _find_file(root: PathLike | None, name: str, patterns: list[str]) -> Path:
    """Find the one file in ``root`` matching ``patterns``; full files beat samples."""
    if root is None:
        raise InputError(
            f"no {name} folder given and no path for {' / '.join(patterns)}; pass "
            "the folder, or the files as train=, val=, test="
        )
    folder = Path(root)
    if not folder.is_dir():
        raise InputError(
            f"{name} folder not found: {folder}; expected a folder holding "
            f"{' and '.join(patterns)}"
        )

    found = sorted({p for pattern in patterns for p in folder.glob(pattern)})
    full = [p for p in found if "sample" not in p.name]
    candidates = full or found
    if not candidates:
        raise InputError(
            f"no {name} file matching {' or '.join(patterns)} in {folder}; pass its "
            "path explicitly (train=, val=, test=) if it is named otherwise"
        )
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise InputError(
            f"several {name} files match {' or '.join(patterns)} in {folder} "
            f"({names}); pass the one to use explicitly (train=, val=, test=)"
        )
    return candidates[0]


def _read_table(
    path: PathLike, labels: list[str], sparse: list[str], dense: list[str], name: str
) -> pd.DataFrame:
    """Read the needed columns of one CSV file, checking they are all there."""
    columns = [*labels, *sparse, *dense]
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{name} file not found: {path}")
    header = pd.read_csv(path, nrows=0).columns
    missing = [c for c in columns if c not in header]
    if missing:
        raise InputError(
            f"{path} lacks the {name} column(s) {', '.join(missing)}; expected "
            f"torch-rechub's format with a header line of {len(columns)} named columns"
        )

    try:
        frame = pd.read_csv(
            path, usecols=columns, dtype=dict.fromkeys(sparse, np.int64)
        )
    except ValueError as error:
        raise InputError(
            f"{path}: the {name} sparse columns must hold integer ids ({error})"
        ) from error
    not_01 = [c for c in labels if not frame[c].isin([0, 1]).all()]
    if not_01:
        raise InputError(
            f"{path}: label column(s) {', '.join(not_01)} hold values other than 0/1"
        )
    negative = [c for c in sparse if (frame[c] < 0).any()]
    if negative:
        raise InputError(
            f"{path}: sparse column(s) {', '.join(negative)} hold negative ids; "
            "expected label-encoded ids 0, 1, 2, ..."
        )
    return frame


def _hold_out(
    frame: pd.DataFrame, fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split off a seeded ``fraction`` of the rows; both parts keep file order."""
    if not 0 < fraction < 1:
        raise InputError(
            f"val_fraction must lie strictly between 0 and 1, got {fraction}"
        )
    order = np.random.default_rng(seed).permutation(len(frame))
    n_val = max(1, round(len(frame) * fraction))
    val_rows, train_rows = np.sort(order[:n_val]), np.sort(order[n_val:])
    return frame.iloc[train_rows], frame.iloc[val_rows]


def _tabular_dataset(
    frames: dict[str, pd.DataFrame],
    sparse: list[str],
    dense: list[str],
    labels: dict[str, str],
) -> Dataset:
    """Build the data set; a sparse vocabulary spans the largest id in any part."""
    vocab = {
        c: max((int(f[c].max()) for f in frames.values() if len(f)), default=-1) + 1
        for c in sparse
    }
    splits = {
        part: tabular_split(frame, sparse, dense, labels)
        for part, frame in frames.items()
    }
    return Dataset(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        tasks=dict(TASKS),
        sparse=vocab,
        dense=list(dense),
        num_classes={},
    )
