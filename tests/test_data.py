"""Tests of fxfuse.data: the containers, and each loader on the real files."""

from __future__ import annotations

import csv
import gzip
import importlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fxfuse.data import (
    Dataset,
    Split,
    ali_ccp,
    aliexpress,
    census_income,
    multifashion,
)
from fxfuse.data.multifashion import overlay, pair_items, read_idx
from fxfuse.errors import InputError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CENSUS = DATA / "census-income-kdd"
ALI_CCP = DATA / "ali-ccp"
ALIEXPRESS = DATA / "aliexpress"
FASHION = Path("/usr/share/datasets/fashion-mnist")

# The package exports a function of the same name, which hides the module attribute.
multifashion_module = importlib.import_module("fxfuse.data.multifashion")


def needs(path: Path, what: str):
    return pytest.mark.skipif(not path.exists(), reason=f"{what} not found at {path}")


needs_census = needs(CENSUS / "train_data.csv.gz", "Census-Income CSV copy")
needs_ali_ccp = needs(ALI_CCP / "ali_ccp_train_sample.csv", "Ali-CCP sample")
needs_aliexpress = needs(
    ALIEXPRESS / "aliexpress_train_sample.csv", "AliExpress sample"
)
needs_fashion = needs(
    FASHION / "t10k-images-idx3-ubyte.gz", "Debian's dataset-fashion-mnist"
)


def assert_splits_equal(a: Split, b: Split):
    if isinstance(a.inputs, dict):
        assert a.inputs.keys() == b.inputs.keys()
        for name in a.inputs:
            assert torch.equal(a.inputs[name], b.inputs[name]), name
    else:
        assert torch.equal(a.inputs, b.inputs)
    assert a.labels.keys() == b.labels.keys()
    for task in a.labels:
        assert torch.equal(a.labels[task], b.labels[task]), task


def assert_datasets_equal(a: Dataset, b: Dataset):
    for part in ("train", "val", "test"):
        assert_splits_equal(getattr(a, part), getattr(b, part))
    assert (a.tasks, a.sparse, a.dense, a.num_classes) == (
        b.tasks,
        b.sparse,
        b.dense,
        b.num_classes,
    )


# --- Split and Dataset -------------------------------------------------------------


def small_split(n: int = 6) -> Split:
    return Split(
        inputs={"a": torch.arange(n), "b": torch.arange(n, dtype=torch.float32) / 10},
        labels={"t": torch.arange(n, dtype=torch.float32) % 2},
    )


def test_split_take_selects_the_same_rows_of_every_tensor():
    split = small_split()
    part = split.take(torch.tensor([4, 1]))
    assert len(part) == 2
    assert part.inputs["a"].tolist() == [4, 1]
    assert part.inputs["b"].tolist() == pytest.approx([0.4, 0.1])
    assert part.labels["t"].tolist() == [0.0, 1.0]
    assert split.take(slice(1, 4)).inputs["a"].tolist() == [1, 2, 3]
    assert part.args() == (part.inputs,)


def test_split_with_tensor_inputs_takes_rows():
    split = Split(torch.arange(12).reshape(6, 2), {"t": torch.arange(6)})
    assert split.take(torch.tensor([5])).inputs.tolist() == [[10, 11]]


def test_split_rejects_tensors_of_different_lengths():
    with pytest.raises(InputError, match="label 't'"):
        Split({"a": torch.arange(3)}, {"t": torch.zeros(4)})


def test_subset_is_deterministic_and_keeps_the_vocabulary():
    data = Dataset(
        small_split(100), small_split(50), small_split(40), {"t": "binary"}, {"a": 100}
    )
    one, two = data.subset(10, 5, seed=3), data.subset(10, 5, seed=3)
    assert (len(one.train), len(one.val), len(one.test)) == (10, 5, 5)
    assert_datasets_equal(one, two)
    assert one.sparse == {"a": 100}
    assert not torch.equal(
        one.train.inputs["a"], data.subset(10, 5, 4).train.inputs["a"]
    )
    # rows stay in their original order and are distinct
    rows = one.train.inputs["a"]
    assert torch.equal(rows, torch.sort(rows).values)
    assert len(set(rows.tolist())) == 10


def test_subset_larger_than_the_data_keeps_every_row():
    data = Dataset(small_split(8), small_split(3), small_split(3), {"t": "binary"})
    assert len(data.subset(100, 100).train) == 8


# --- Census-Income ---------------------------------------------------------------


@pytest.fixture(scope="module")
def census() -> Dataset:
    return census_income(CENSUS)


@needs_census
def test_census_has_the_published_counts(census):
    assert len(census.train) == 199_523
    assert census.train.labels["income"].sum().item() == 12_382
    assert census.train.labels["never_married"].sum().item() == 86_485

    assert (len(census.val), len(census.test)) == (49_881, 49_881)
    income = census.val.labels["income"].sum() + census.test.labels["income"].sum()
    married = (
        census.val.labels["never_married"].sum()
        + census.test.labels["never_married"].sum()
    )
    assert (income.item(), married.item()) == (6_186, 43_143)


@needs_census
def test_census_val_and_test_keep_the_income_rate(census):
    rates = [s.labels["income"].mean().item() for s in (census.val, census.test)]
    assert abs(rates[0] - rates[1]) <= 0.001
    assert rates[0] == pytest.approx(6_186 / 99_762, abs=0.001)


@needs_census
def test_census_features_and_tasks(census):
    assert census.tasks == {"income": "binary", "never_married": "binary"}
    assert len(census.sparse) == 31 and len(census.dense) == 7
    assert "marital_stat" not in census.train.inputs
    assert "income" not in census.train.inputs
    assert "migration_code-change_in_msa" in census.sparse
    # distinct train values (census-income.names) + the reserved unknown id 0
    assert census.sparse["sex"] == 3
    assert census.sparse["class_of_worker"] == 10
    assert census.sparse["education"] == 18
    for name, size in census.sparse.items():
        ids = census.train.inputs[name]
        assert ids.dtype == torch.int64
        assert ids.min().item() == 1 and ids.max().item() == size - 1, name


@needs_census
def test_census_known_rows_are_encoded_and_scaled(census):
    # train rows 0 and 1: "73,NIU,...,Female,..." and "58,Self-employed-...,Male,..."
    sex = census.train.inputs["sex"][:2].tolist()
    assert sex == [1, 2]  # Female, Male in sorted order, after the reserved 0
    age = census.train.inputs["age"]
    assert age.dtype == torch.float32
    assert (age.min().item(), age.max().item()) == (0.0, 1.0)
    assert age[0].item() == pytest.approx(73 / 90)  # train ages run 0..90
    assert census.train.labels["never_married"][:2].tolist() == [0.0, 0.0]


@needs_census
def test_census_split_is_the_same_for_the_same_seed(census):
    again = census_income(CENSUS)
    assert_splits_equal(census.val, again.val)
    other = census_income(CENSUS, seed=1)
    assert not torch.equal(census.val.inputs["age"], other.val.inputs["age"])


def write_lines(source: Path, target: Path, n: int, skip: int = 0):
    """Write lines ``skip .. skip + n`` of a gzipped text file, gzipped by suffix."""
    with gzip.open(source, "rt") as f:
        lines = [next(f) for _ in range(skip + n)][skip:]
    opener = gzip.open if target.suffix == ".gz" else open
    with opener(target, "wt") as f:
        f.writelines(lines)


def census_csv_folder(folder: Path, n: int) -> Path:
    """A CSV-copy folder whose train and test are the first n rows of the test CSV."""
    folder.mkdir()
    rows = pd.read_csv(CENSUS / "test_data.csv.gz", keep_default_na=False, nrows=n)
    rows.to_csv(folder / "train_data.csv.gz", index=False)
    rows.to_csv(folder / "test_data.csv.gz", index=False)
    return folder


@needs_census
def test_census_reads_the_uci_files_like_the_csv_copy(tmp_path):
    uci = tmp_path / "uci"
    uci.mkdir()
    write_lines(CENSUS / "census-income.test.gz", uci / "census-income.data.gz", 300)
    write_lines(CENSUS / "census-income.test.gz", uci / "census-income.test", 300)
    copy = census_csv_folder(tmp_path / "copy", 300)

    from_uci, from_copy = census_income(uci), census_income(copy)
    assert len(from_uci.train) == 300
    assert from_uci.train.labels["income"].sum().item() == 14
    assert_datasets_equal(from_uci, from_copy)


@needs_census
def test_census_prefers_the_csv_copy(tmp_path):
    folder = census_csv_folder(tmp_path / "both", 200)
    (folder / "census-income.data").write_text("not, a, census, file\n")
    (folder / "census-income.test").write_text("not, a, census, file\n")
    assert len(census_income(folder).train) == 200


@needs_census
def test_census_maps_values_unseen_in_train_to_id_zero(tmp_path):
    folder = census_csv_folder(tmp_path / "unseen", 200)
    test = pd.read_csv(folder / "test_data.csv.gz", keep_default_na=False)
    test.loc[0, "education"] = "A value train never had"
    test.to_csv(folder / "test_data.csv.gz", index=False)

    data = census_income(folder)
    ids = torch.cat([data.val.inputs["education"], data.test.inputs["education"]])
    assert (ids == 0).sum().item() == 1
    assert (data.train.inputs["education"] > 0).all()


def test_census_names_the_missing_folder(tmp_path):
    with pytest.raises(InputError, match="folder not found: .*nowhere"):
        census_income(tmp_path / "nowhere")


@needs_census
def test_census_names_the_missing_file(tmp_path):
    shutil.copy(CENSUS / "train_data.csv.gz", tmp_path)
    with pytest.raises(InputError, match=r"found: train_data.csv.gz.*test_data"):
        census_income(tmp_path)


@needs_census
def test_census_names_a_missing_column(tmp_path):
    folder = census_csv_folder(tmp_path / "cols", 50)
    rows = pd.read_csv(folder / "test_data.csv.gz", keep_default_na=False)
    rows.drop(columns="education").to_csv(folder / "test_data.csv.gz", index=False)
    with pytest.raises(InputError, match=r"test_data.csv.gz lacks .* education"):
        census_income(folder)


# --- Ali-CCP ---------------------------------------------------------------------


def column_max(path: Path, column: str) -> int:
    with open(path, newline="") as f:
        return max(int(row[column]) for row in csv.DictReader(f))


@needs_ali_ccp
def test_ali_ccp_sample_counts_and_schema():
    data = ali_ccp(ALI_CCP)
    assert (len(data.train), len(data.val), len(data.test)) == (100, 50, 50)
    sums = [
        (s.labels["ctr"].sum().item(), s.labels["cvr"].sum().item())
        for s in (data.train, data.val, data.test)
    ]
    assert sums == [(7, 1), (3, 1), (2, 1)]
    assert data.tasks == {"ctr": "binary", "cvr": "binary"}
    assert len(data.sparse) == 23 and len(data.dense) == 8
    assert "click" not in data.train.inputs and "purchase" not in data.train.inputs
    assert data.train.inputs["D109_14"][0].item() == pytest.approx(0.4734)
    assert data.train.inputs["205"].dtype == torch.int64
    assert data.train.inputs["D508"].dtype == torch.float32


@needs_ali_ccp
def test_ali_ccp_vocabulary_spans_all_three_files():
    data = ali_ccp(ALI_CCP)
    for column in ("205", "210", "301"):
        largest = max(
            column_max(ALI_CCP / f"ali_ccp_{part}_sample.csv", column)
            for part in ("train", "val", "test")
        )
        assert data.sparse[column] == largest + 1
    assert data.sparse["210"] == 158


@needs_ali_ccp
def test_ali_ccp_accepts_explicit_paths():
    paths = {p: ALI_CCP / f"ali_ccp_{p}_sample.csv" for p in ("train", "val", "test")}
    assert_datasets_equal(ali_ccp(**paths), ali_ccp(ALI_CCP))


@needs_ali_ccp
def test_ali_ccp_prefers_full_files_to_samples(tmp_path):
    for part in ("train", "val", "test"):
        shutil.copy(ALI_CCP / f"ali_ccp_{part}_sample.csv", tmp_path)
    sample = pd.read_csv(ALI_CCP / "ali_ccp_train_sample.csv")
    sample.head(30).to_csv(tmp_path / "ali_ccp_train.csv", index=False)
    assert len(ali_ccp(tmp_path).train) == 30


@needs_ali_ccp
def test_ali_ccp_names_the_missing_file(tmp_path):
    for part in ("train", "test"):
        shutil.copy(ALI_CCP / f"ali_ccp_{part}_sample.csv", tmp_path)
    with pytest.raises(InputError, match=r"ali_ccp_val\*\.csv"):
        ali_ccp(tmp_path)
    with pytest.raises(InputError, match="file not found: .*missing.csv"):
        ali_ccp(tmp_path, val=tmp_path / "missing.csv")


@needs_ali_ccp
def test_ali_ccp_names_a_missing_column(tmp_path):
    for part in ("train", "val", "test"):
        shutil.copy(ALI_CCP / f"ali_ccp_{part}_sample.csv", tmp_path)
    test = pd.read_csv(tmp_path / "ali_ccp_test_sample.csv")
    test.drop(columns="D702").to_csv(tmp_path / "ali_ccp_test_sample.csv", index=False)
    with pytest.raises(InputError, match="ali_ccp_test_sample.csv lacks .*D702"):
        ali_ccp(tmp_path)


def test_ali_ccp_names_the_missing_folder(tmp_path):
    with pytest.raises(InputError, match="Ali-CCP folder not found: .*absent"):
        ali_ccp(tmp_path / "absent")


# --- AliExpress ------------------------------------------------------------------


@needs_aliexpress
def test_aliexpress_sample_counts_and_schema():
    data = aliexpress(ALIEXPRESS)
    assert (len(data.train), len(data.val), len(data.test)) == (90, 10, 20)
    clicks = data.train.labels["ctr"].sum() + data.val.labels["ctr"].sum()
    conversions = data.train.labels["cvr"].sum() + data.val.labels["cvr"].sum()
    assert (clicks.item(), conversions.item()) == (60, 2)
    assert data.test.labels["ctr"].sum().item() == 10
    assert data.test.labels["cvr"].sum().item() == 2
    assert len(data.sparse) == 16 and len(data.dense) == 63
    assert "search_id" not in data.train.inputs
    for column in ("categorical_1", "categorical_7"):
        largest = max(
            column_max(ALIEXPRESS / f"aliexpress_{part}_sample.csv", column)
            for part in ("train", "test")
        )
        assert data.sparse[column] == largest + 1


@needs_aliexpress
def test_aliexpress_validation_rows_depend_only_on_the_seed():
    one, two = aliexpress(ALIEXPRESS), aliexpress(ALIEXPRESS)
    assert_datasets_equal(one, two)
    other = aliexpress(ALIEXPRESS, seed=1)
    assert not torch.equal(
        one.val.inputs["numerical_30"], other.val.inputs["numerical_30"]
    )


@needs_aliexpress
def test_aliexpress_names_the_missing_test_file(tmp_path):
    shutil.copy(ALIEXPRESS / "aliexpress_train_sample.csv", tmp_path)
    with pytest.raises(InputError, match=r"\*test\*\.csv in .*test_aliexpress_names"):
        aliexpress(tmp_path)


# --- MultiFashion ----------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion() -> Dataset:
    return multifashion()


@pytest.fixture(scope="module")
def fashion_test_items() -> tuple[np.ndarray, np.ndarray]:
    items = read_idx(FASHION / "t10k-images-idx3-ubyte.gz", ndim=3)
    labels = read_idx(FASHION / "t10k-labels-idx1-ubyte.gz", ndim=1)
    return items, labels


def test_overlay_places_items_and_keeps_the_brighter_pixel():
    items = np.zeros((2, 28, 28), dtype=np.uint8)
    items[0, :, :] = 100
    items[1, :, :] = 50
    items[1, 0, 0] = 200  # lands at (8, 8), inside item 0
    canvas = overlay(items, np.array([1, 0]))
    assert canvas.shape == (2, 36, 36)
    first = canvas[0]
    assert first[0, 0] == 100 and first[27, 27] == 100  # left item only / overlap
    assert first[8, 8] == 200  # overlap, right item brighter
    assert first[35, 35] == 50 and first[0, 35] == 0 and first[35, 0] == 0


def test_pair_items_never_pairs_an_item_with_itself():
    partner = pair_items(1000, np.random.default_rng(0))
    assert (partner != np.arange(1000)).all()
    assert sorted(partner.tolist()) == list(range(1000))


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_multifashion_validation_images_share_no_item_with_training_images(tmp_path):
    # Item i carries its number in two corners: its top-left pixels stay visible
    # when it is the left item, its bottom-right ones when it is the right item.
    def items(n: int) -> np.ndarray:
        ids = np.arange(n)
        array = np.zeros((n, 28, 28), dtype=np.uint8)
        array[:, 0, 0], array[:, 0, 1] = ids % 256, ids // 256
        array[:, 27, 27], array[:, 27, 26] = ids % 256, ids // 256
        return array

    for name, n in (("train", 600), ("t10k", 100)):
        _write_idx(tmp_path / f"{name}-images-idx3-ubyte", items(n))
        _write_idx(tmp_path / f"{name}-labels-idx1-ubyte", np.arange(n) % 10)
    data = multifashion(tmp_path, n_val=100)

    def used(split) -> set[int]:
        pixels = (split.inputs[:, 0] * 255).round().long()
        left = pixels[:, 0, 0] + 256 * pixels[:, 0, 1]
        right = pixels[:, 35, 35] + 256 * pixels[:, 35, 34]
        assert torch.equal(torch.sort(left).values, torch.sort(right).values)
        return set(left.tolist())

    train, val = used(data.train), used(data.val)
    assert (len(train), len(val)) == (500, 100)
    assert not train & val
    assert train | val == set(range(600))


def test_read_idx_reads_plain_and_gzipped_files(tmp_path):
    header = bytes([0, 0, 8, 3]) + np.array([2, 2, 3], ">u4").tobytes()
    payload = bytes(range(12))
    (tmp_path / "x-idx3-ubyte").write_bytes(header + payload)
    (tmp_path / "x-idx3-ubyte.gz").write_bytes(gzip.compress(header + payload))
    for name in ("x-idx3-ubyte", "x-idx3-ubyte.gz"):
        array = read_idx(tmp_path / name, ndim=3)
        assert array.shape == (2, 2, 3) and array[1, 1, 2] == 11
    with pytest.raises(InputError, match="not an unsigned-byte IDX file with 1"):
        read_idx(tmp_path / "x-idx3-ubyte", ndim=1)


@needs_fashion
def test_multifashion_splits_shapes_and_tasks(fashion):
    assert (len(fashion.train), len(fashion.val), len(fashion.test)) == (
        50_000,
        10_000,
        10_000,
    )
    images = fashion.test.inputs
    assert images.shape == (10_000, 1, 36, 36) and images.dtype == torch.float32
    assert images.min().item() == 0.0 and images.max().item() == 1.0
    assert fashion.tasks == {"left": "multiclass", "right": "multiclass"}
    assert fashion.num_classes == {"left": 10, "right": 10}
    assert (fashion.sparse, fashion.dense) == ({}, [])


@needs_fashion
def test_multifashion_labels_use_each_item_once_per_side(fashion, fashion_test_items):
    _, raw = fashion_test_items
    left, right = fashion.test.labels["left"], fashion.test.labels["right"]
    assert left.dtype == torch.int64
    assert left.tolist() == raw.tolist()  # test images keep the items' order
    assert torch.equal(torch.bincount(right), torch.bincount(left))
    assert (left != right).float().mean().item() > 0.8
    train_left = torch.cat([fashion.train.labels["left"], fashion.val.labels["left"]])
    assert torch.bincount(train_left).tolist() == [6000] * 10


@needs_fashion
def test_multifashion_image_is_the_max_of_the_placed_items(fashion, fashion_test_items):
    items, _ = fashion_test_items
    for i in (0, 1234, 9999):
        image = fashion.test.inputs[i, 0]
        # Rows 28..35 show only the right item's rows 20..27; find that item.
        strip = (image[28:, 8:] * 255).round().to(torch.uint8).numpy()
        matches = np.flatnonzero((items[:, 20:, :] == strip).all(axis=(1, 2)))
        assert len(matches) == 1, f"image {i}: right item not identified"
        right = items[matches[0]]

        expected = np.zeros((36, 36), dtype=np.uint8)
        expected[:28, :28] = items[i]
        expected[8:, 8:] = np.maximum(expected[8:, 8:], right)
        assert torch.equal(image, torch.from_numpy(expected).float() / 255)
        assert round(image[20, 20].item() * 255) == max(items[i, 20, 20], right[12, 12])


@needs_fashion
def test_multifashion_is_deterministic_per_seed(fashion):
    again = multifashion(seed=0)
    assert_datasets_equal(fashion, again)
    other = multifashion(seed=1, n_val=5000)
    assert len(other.val) == 5000
    assert not torch.equal(fashion.test.labels["right"], other.test.labels["right"])


def test_multifashion_without_files_says_where_it_looked(tmp_path):
    with pytest.raises(InputError) as error:
        multifashion(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "train-images-idx3-ubyte" in message
    assert "dataset-fashion-mnist" in message and "download=True" in message


@needs_fashion
def test_multifashion_download_checks_the_content(tmp_path, monkeypatch):
    # A local "server" (file:// URL) stands in for Zalando's; nothing leaves the host.
    monkeypatch.setattr(multifashion_module, "URL", FASHION.as_uri() + "/")
    target = tmp_path / "fetched"
    data = multifashion(target, download=True)
    assert sorted(p.name for p in target.iterdir()) == sorted(
        f"{name}.gz" for name in multifashion_module.CONTENT_SHA256
    )
    assert torch.equal(data.test.inputs[:100], multifashion().test.inputs[:100])


def test_multifashion_download_rejects_a_wrong_file(tmp_path, monkeypatch):
    server = tmp_path / "server"
    server.mkdir()
    (server / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"tampered"))
    monkeypatch.setattr(multifashion_module, "URL", server.as_uri() + "/")
    target = tmp_path / "fetched"
    with pytest.raises(InputError, match="train-images-idx3-ubyte.gz does not match"):
        multifashion(target, download=True)
    assert list(target.iterdir()) == []
