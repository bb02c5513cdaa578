"""Census-Income (KDD) from UCI, as the two-task set of the MMoE and PLE papers.

Tasks: ``income`` (over 50K a year) and ``never_married`` (marital status "Never
married"; the marital status column is then not a feature). Seven numeric columns are
min-max scaled, every other column is label-encoded, both fitted on the train rows.
The UCI test rows are split 1:1 into validation and test, stratified on income.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from ..errors import InputError
from ._split import Dataset, Split, tabular_split

# The 40 columns of the CSV copy, in file order.
COLUMNS = [
    "age",
    "class_of_worker",
    "detailed_industry_recode",
    "detailed_occupation_recode",
    "education",
    "wage_per_hour",
    "enroll_in_edu_inst_last_wk",
    "marital_stat",
    "major_industry_code",
    "major_occupation_code",
    "race",
    "hispanic_origin",
    "sex",
    "member_of_a_labor_union",
    "reason_for_unemployment",
    "full_or_part_time_employment_stat",
    "capital_gains",
    "capital_losses",
    "dividends_from_stocks",
    "tax_filer_stat",
    "region_of_previous_residence",
    "state_of_previous_residence",
    "detailed_household_and_family_stat",
    "detailed_household_summary_in_household",
    "migration_code-change_in_msa",
    "migration_code-change_in_reg",
    "migration_code-move_within_reg",
    "live_in_this_house_1_year_ago",
    "migration_prev_res_in_sunbelt",
    "num_persons_worked_for_employer",
    "family_members_under_18",
    "country_of_birth_father",
    "country_of_birth_mother",
    "country_of_birth_self",
    "citizenship",
    "own_business_or_self_employed",
    "fill_inc_questionnaire_for_veterans_admin",
    "veterans_benefits",
    "weeks_worked_in_year",
    "income",
]

# The 42 columns of the UCI files (census-income.names), named as in the CSV copy:
# the copy lacks the instance weight (after the household summary) and the year.
UCI_COLUMNS = COLUMNS[:24] + ["instance_weight"] + COLUMNS[24:39] + ["year", "income"]

DENSE = [
    "age",
    "wage_per_hour",
    "capital_gains",
    "capital_losses",
    "dividends_from_stocks",
    "num_persons_worked_for_employer",
    "weeks_worked_in_year",
]
LABEL_COLUMNS = ["income", "marital_stat"]
SPARSE = [c for c in COLUMNS if c not in DENSE and c not in LABEL_COLUMNS]
TASKS = {"income": "binary", "never_married": "binary"}

_CSV_NAMES = (
    ("train_data.csv.gz", "train_data.csv"),
    ("test_data.csv.gz", "test_data.csv"),
)
_UCI_NAMES = (
    ("census-income.data.gz", "census-income.data"),
    ("census-income.test.gz", "census-income.test"),
)
_UCI_INCOME = {"- 50000.": 0, "50000+.": 1}


def census_income(root: str | Path, seed: int = 0) -> Dataset:
    """Load Census-Income (KDD) as a two-task binary data set.

    ``root`` holds either the 40-column CSV copy (``train_data.csv.gz`` and
    ``test_data.csv.gz``) or the original UCI files (``census-income.data[.gz]`` and
    ``census-income.test[.gz]``); the CSV copy is read when both are there. Both give
    the same rows: UCI category values are stripped and renamed as in the copy
    (``Not in universe...`` becomes ``NIU``; ``?`` and ``Not identifiable`` become
    ``NA``), and the instance weight and year are dropped.

    Sparse ids: each category value seen in train gets an id from 1 in sorted order;
    a value never seen in train gets the reserved id 0. Dense values are scaled to
    [0, 1] over train; validation and test values may fall outside (nothing is
    clipped).

    Args:
        root: The folder holding the files.
        seed: Seed of the stratified validation/test split.

    Returns:
        The data set: train = the UCI train rows (199,523); validation and test =
        the UCI test rows (99,762) split 1:1, stratified on income.

    Raises:
        InputError: The folder, a file or a column is missing, or a label is unknown.
    """
    kind, train_path, test_path = _find_files(Path(root))
    read = _read_csv_copy if kind == "csv" else _read_uci
    train, test = read(train_path), read(test_path)

    train, test = _add_labels(train), _add_labels(test)
    vocab = _encode_sparse(train, test)
    _scale_dense(train, test)

    val_rows, test_rows = _split_val_test(test["income"].to_numpy(), seed)
    return Dataset(
        train=_to_split(train),
        val=_to_split(test.iloc[val_rows]),
        test=_to_split(test.iloc[test_rows]),
        tasks=dict(TASKS),
        sparse=vocab,
        dense=list(DENSE),
        num_classes={},
    )


def _find_files(root: Path) -> tuple[str, Path, Path]:
    """Return ``("csv" | "uci", train_path, test_path)``, preferring the CSV copy."""
    if not root.is_dir():
        raise InputError(
            f"Census-Income folder not found: {root}; pass the folder holding "
            "train_data.csv.gz and test_data.csv.gz (or the UCI census-income.data "
            "and census-income.test)"
        )
    csv = [_first_present(root, names) for names in _CSV_NAMES]
    uci = [_first_present(root, names) for names in _UCI_NAMES]
    if all(csv):
        return "csv", csv[0], csv[1]
    if all(uci):
        return "uci", uci[0], uci[1]

    found = [p.name for p in csv + uci if p]
    raise InputError(
        f"no complete Census-Income file pair in {root} (found: "
        f"{', '.join(found) or 'none'}); expected train_data.csv[.gz] + "
        "test_data.csv[.gz], or census-income.data[.gz] + census-income.test[.gz]"
    )


def _first_present(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (root / name).is_file():
            return root / name
    return None


def _read_csv_copy(path: Path) -> pd.DataFrame:
    """Read one file of the 40-column CSV copy (``NA`` is a category, not missing)."""
    frame = pd.read_csv(path, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(
            f"{path} lacks the Census-Income column(s) {', '.join(missing)}; "
            "expected the 40-column CSV copy with a header line"
        )
    if not frame["income"].isin([0, 1]).all():
        raise InputError(f"{path}: column income holds values other than 0 and 1")
    return frame[COLUMNS]


def _read_uci(path: Path) -> pd.DataFrame:
    """Read one UCI file and bring it to the CSV copy's columns and values."""
    frame = pd.read_csv(path, header=None, skipinitialspace=True, keep_default_na=False)
    if frame.shape[1] != len(UCI_COLUMNS):
        raise InputError(
            f"{path} has {frame.shape[1]} columns; a UCI Census-Income file has "
            f"{len(UCI_COLUMNS)} (no header line)"
        )
    frame.columns = UCI_COLUMNS
    frame = frame.drop(columns=["instance_weight", "year"])

    for column in frame.select_dtypes(include=["object", "string"]).columns:
        frame[column] = _normalise_categories(frame[column])
    return _uci_income_to_01(frame, path)


def _normalise_categories(values: pd.Series) -> pd.Series:
    """Strip values and rename them as the CSV copy does, once per distinct value."""
    codes, uniques = pd.factorize(values)
    renamed = np.array([_normalise_category(str(u)) for u in uniques], dtype=object)
    return pd.Series(renamed[codes], index=values.index, dtype="str")


def _normalise_category(value: str) -> str:
    value = value.strip()
    if value.startswith("Not in universe"):
        return "NIU"
    # The CSV copy also reads "Not identifiable" (a migration code) as NA.
    if value in ("?", "Not identifiable"):
        return "NA"
    return value


def _uci_income_to_01(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    income = frame["income"].map(_UCI_INCOME)
    if income.isna().any():
        bad = frame.loc[income.isna(), "income"].iloc[0]
        raise InputError(
            f"{path}: unknown income label {bad!r}; expected '- 50000.' or '50000+.'"
        )
    frame["income"] = income.astype(np.int64)
    return frame


def _add_labels(frame: pd.DataFrame) -> pd.DataFrame:
    """Add the two 0/1 task columns ``income`` (already 0/1) and ``never_married``."""
    never_married = (frame["marital_stat"] == "Never married").astype(np.int64)
    return frame.assign(never_married=never_married)


def _encode_sparse(train: pd.DataFrame, test: pd.DataFrame) -> dict[str, int]:
    """Replace sparse values by ids fitted on train, in place; return vocab sizes."""
    vocab = {}
    for column in SPARSE:
        train_values, test_values = train[column], test[column]
        if train_values.dtype != test_values.dtype:  # e.g. numbers in one file only
            train_values, test_values = (
                train_values.astype(str),
                test_values.astype(str),
            )
        train_ids, known = pd.factorize(train_values, sort=True)
        test_ids = known.get_indexer(test_values)  # -1 where unknown
        train[column] = train_ids.astype(np.int64) + 1
        test[column] = test_ids.astype(np.int64) + 1
        vocab[column] = len(known) + 1
    return vocab


def _scale_dense(train: pd.DataFrame, test: pd.DataFrame) -> None:
    """Min-max scale the dense columns with train's range, in place."""
    for column in DENSE:
        low = float(train[column].min())
        span = float(train[column].max()) - low
        span = span if span > 0 else 1.0
        for frame in (train, test):
            frame[column] = ((frame[column].astype(np.float64) - low) / span).astype(
                np.float32
            )


def _split_val_test(income: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the test rows 1:1 stratified on income; each part in file order."""
    rows = np.arange(len(income))
    val_rows, test_rows = train_test_split(
        rows, test_size=0.5, stratify=income, random_state=seed
    )
    return np.sort(val_rows), np.sort(test_rows)


def _to_split(frame: pd.DataFrame) -> Split:
    labels = {"income": "income", "never_married": "never_married"}
    return tabular_split(frame, SPARSE, DENSE, labels)
