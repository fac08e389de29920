"""Manifest labels: one rule, numbers compared as numbers, ambiguous columns refused with
each label's row count, and classes=/num_classes= to state the task."""

from __future__ import annotations

import logging

import pytest

import lightning_streaming as ls


def manifest(tmp_path, *labels: str, name: str = "m.csv", **options) -> ls.Manifest:
    path = tmp_path / name
    path.write_text("slide,label\n" + "".join(f"s{i}.svs,{label}\n" for i, label in enumerate(labels)))
    return ls.Manifest.read(path, check_files=False, **options)


def targets(m: ls.Manifest) -> list[int]:
    return [int(row.target) for row in m.rows]


def test_numbers_are_compared_as_numbers(tmp_path):
    m = manifest(tmp_path, "1.0", "0", "1", "01")
    assert targets(m) == [1, 0, 1, 1] and m.classes == ("0", "1") and m.num_classes == 2


def test_a_column_mixing_numbers_and_names_is_refused_with_the_counts(tmp_path):
    with pytest.raises(ls.ManifestError, match="mixes numbers and names") as info:
        manifest(tmp_path, "1", "0", "tumour", "1")
    message = str(info.value)
    assert "'0' (1 row: line 3), '1' (2 rows: lines 2, 5), 'tumour' (1 row: line 4)" in message
    assert "classes=[" in message and "num_classes=" in message
    # Stated classes make the same column unambiguous: numbers are class indices.
    stated = manifest(tmp_path, "1", "0", "tumour", "1", classes=["normal", "tumour"])
    assert targets(stated) == [1, 0, 1, 1]


def test_integer_labels_that_skip_classes_are_refused_unless_stated(tmp_path):
    with pytest.raises(ls.ManifestError, match=r"skip class\(es\) \[1, 2, 3, 4\]: '0' \(2 rows: lines 2, 3\), '5'"):
        manifest(tmp_path, "0", "0", "5")
    stated = manifest(tmp_path, "0", "0", "5", num_classes=6)
    assert stated.num_classes == 6 and targets(stated) == [0, 0, 5]
    with pytest.raises(ls.LabelParseError, match=r"label='7' is not one of \['0', '1', '2', '3', '4', '5'\]"):
        manifest(tmp_path, "0", "7", num_classes=6)


def test_fractions_case_clashes_and_contradictions_are_refused(tmp_path):
    with pytest.raises(ls.ManifestError, match="class indices 0, 1, 2, ... or names.*task='regression'"):
        manifest(tmp_path, "0", "0.5")
    with pytest.raises(ls.ManifestError, match=r"differ only in case: \['Tumour', 'tumour'\]"):
        manifest(tmp_path, "normal", "tumour", "Tumour")
    assert manifest(tmp_path, "normal", "Tumour", "tumour", classes=["normal", "Tumour", "tumour"]).num_classes == 3
    with pytest.raises(ValueError, match="names 2 classes but num_classes=3"):
        manifest(tmp_path, "0", "1", classes=["a", "b"], num_classes=3)
    with pytest.raises(ValueError, match="for task='classification'"):
        manifest(tmp_path, "0", "1", num_classes=2, task="regression")


def test_stated_classes_without_rows_are_warned_about(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lightning_streaming"):
        m = manifest(tmp_path, "normal", "normal", classes=["normal", "tumour"])
    assert targets(m) == [0, 0]
    assert any("no rows of class(es) ['tumour']" in r.getMessage() and "'normal' (2 rows" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_the_datamodule_states_the_task_for_every_manifest(tmp_path, caplog, example_slides):
    def write(name: str, *labels: str):
        rows = "".join(f"{example_slides.small_svs},{label}\n" for label in labels)
        (tmp_path / name).write_text("slide,label\n" + rows)
        return tmp_path / name

    train, val = write("train.csv", "2", "0", "1.0"), write("val.csv", "2.0", "2")
    data = ls.SlideDataModule(train=train, val=val, spacing=1.0, tissue=None)
    with caplog.at_level(logging.WARNING, logger="lightning_streaming"):
        data.setup("fit")
    manifests = {stage: dataset.manifest for stage, dataset in data.datasets.items()}
    assert manifests["train"].classes == manifests["val"].classes == ("0", "1", "2")  # the training manifest's
    assert targets(manifests["val"]) == [2, 2] and data.num_classes == 3
    assert any("no rows of class(es) ['0', '1']" in r.getMessage() for r in caplog.records)
    stated = ls.SlideDataModule(train=val, spacing=1.0, num_classes=3, tissue=None)
    stated.setup("fit")
    assert stated.num_classes == 3 and stated.hparams.num_classes == 3
    with pytest.raises(ls.ManifestError, match="skip class"):
        ls.SlideDataModule(train=val, spacing=1.0, tissue=None).setup("fit")
