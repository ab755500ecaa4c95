"""Low-shot subsets: deterministic generation, saving, reading the published layout, selection."""

import pytest
from torch.utils.data import Subset

from neco.errors import ConfigError
from neco.eval.hummingbird.lowshot import (
    dataset_ids,
    fraction_tag,
    generate_ids,
    read_ids,
    resolve_subset,
    select,
)


class _Named:
    name, split = "voc", "train"

    def __init__(self, n):
        self.ids = [f"2008_{i:06d}" for i in range(n)]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return i

    def image_id(self, i):
        return self.ids[i]


def test_fraction_tags():
    assert fraction_tag(0.125) == "1_div_8"
    assert fraction_tag(0.015625) == "1_div_64"
    assert fraction_tag(0.0078125) == "1_div_128"
    assert fraction_tag(1 / 3) == "1_div_3"
    assert fraction_tag(0.3) == "frac_0.3"


def test_generated_subsets_are_deterministic_sized_and_seed_dependent():
    ids = [f"img{i:04d}" for i in range(1000)]
    a = generate_ids(ids[::-1], 0.125, 42)  # the order the dataset lists its ids in does not matter
    assert a == generate_ids(ids, 0.125, 42)
    assert len(a) == 125 and a == sorted(a) and set(a) <= set(ids) and len(set(a)) == 125
    assert a != generate_ids(ids, 0.125, 400)
    assert len(generate_ids(ids, 1 / 128, 42)) == 8  # round(7.8125)
    assert len(generate_ids(ids[:50], 1 / 128, 42)) == 1  # never empty


def test_resolve_generates_and_saves_the_list(tmp_path):
    data = _Named(300)
    sub = resolve_subset(data, "voc", 0.125, 783, None, tmp_path / "out")
    assert sub["source"] == "generated"
    assert sub["saved"] == str(tmp_path / "out" / "subsets" / "voc_1_div_8_783.txt")
    assert read_ids(sub["saved"]) == sub["ids"] == generate_ids(data.ids, 0.125, 783)
    # The saved folder works as a subset_dir: the same list comes back.
    again = resolve_subset(data, "voc", 0.125, 783, tmp_path / "out" / "subsets", tmp_path / "out2")
    assert again["ids"] == sub["ids"] and again["source"].endswith("voc_1_div_8_783.txt")


def test_published_layout_is_read(tmp_path):
    folder = tmp_path / "file_sets" / "voc" / "1_div_128"
    folder.mkdir(parents=True)
    (folder / "trainaug_128_42.txt").write_text("2008_000007\n2008_000003\n\n")
    sub = resolve_subset(_Named(20), "voc", 0.0078125, 42, tmp_path / "file_sets", tmp_path / "out")
    assert sub["ids"] == ["2008_000007", "2008_000003"]
    ade = tmp_path / "ade" / "1_div_8"
    ade.mkdir(parents=True)
    (ade / "training_8_4019.txt").write_text("ADE_train_00000001\n")
    assert resolve_subset(_Named(1), "ade20k", 0.125, 4019, tmp_path / "ade", tmp_path / "o")["ids"] == [
        "ADE_train_00000001"]
    with pytest.raises(ConfigError, match="trainaug_128_400.txt"):
        resolve_subset(_Named(20), "voc", 0.0078125, 400, tmp_path / "file_sets", tmp_path / "out")


def test_select_by_ids_without_a_select_method():
    data = _Named(10)
    sub = select(data, ["2008_000004", "2008_000001"])
    assert isinstance(sub, Subset) and list(sub.indices) == [4, 1]
    with pytest.raises(ConfigError, match="not in the train split"):
        select(data, ["2099_000000"])
    assert dataset_ids([10, 11]) == ["0", "1"]  # no image_id: the index is the id
