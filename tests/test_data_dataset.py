"""Manifests, augmentation views, the slide dataset (eager and lazy), the bad-sample policy,
samplers, batching and training-set statistics."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import lightning_streaming as ls
from lightning_streaming.data.augment import ColourSource, OrientedSource, WindowSource


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


@pytest.fixture
def manifest_dir(example_slides, tmp_path):
    """A folder with links to the example slides, so manifests can use relative paths."""
    for name, attribute in [("cmu_small_region.svs", "cmu_small_region"), ("small.svs", "small_svs"),
                            ("unreadable.svs", "unreadable_svs"), ("unopenable.tiff", "unopenable_tiff")]:  # fmt: skip
        (tmp_path / name).symlink_to(getattr(example_slides, attribute))
    return tmp_path


# -- manifests ----------------------------------------------------------------------------


def test_manifest_with_class_names_indices_and_relative_paths(manifest_dir):
    path = write_csv(manifest_dir / "train.csv", "slide,label\ncmu_small_region.svs,tumour\nsmall.svs,normal")
    manifest = ls.Manifest.read(path)
    assert manifest.classes == ("normal", "tumour") and manifest.num_classes == 2
    assert [r.target for r in manifest.rows] == [1, 0]
    assert manifest.rows[0].slide == (manifest_dir / "cmu_small_region.svs").resolve() and manifest.rows[1].line == 3
    path = write_csv(manifest_dir / "ints.csv", "slide,label\ncmu_small_region.svs,2\nsmall.svs,0")
    stated = ls.Manifest.read(path, num_classes=3)  # class 1 has no rows here: stated, so allowed
    assert [r.target for r in stated.rows] == [2, 0] and stated.num_classes == 3 and stated.classes == ("0", "1", "2")


def test_manifest_multilabel_regression_and_base_spacing(manifest_dir):
    path = write_csv(manifest_dir / "m.csv", "slide,a,b,base_spacing\nsmall.svs,1,0,0.25\ncmu_small_region.svs,0,1,")
    manifest = ls.Manifest.read(path, task="multilabel")
    assert manifest.target_columns == ("a", "b") and manifest.num_classes == 2
    assert torch.equal(manifest.rows[0].target, torch.tensor([1.0, 0.0])) and manifest.rows[0].base_spacing == 0.25
    assert manifest.rows[1].base_spacing is None
    path = write_csv(manifest_dir / "r.csv", "slide,score\nsmall.svs,0.75\ncmu_small_region.svs,-2e3")
    regression = ls.Manifest.read(path, task="regression")
    assert [float(r.target) for r in regression.rows] == [0.75, -2000.0] and regression.num_classes is None


def test_manifest_problems_name_file_line_and_value(manifest_dir, caplog):
    text = "slide,label\nsmall.svs,normal\nmissing.svs,normal\ncmu_small_region.svs,tumor\nsmall.svs,"
    path = write_csv(manifest_dir / "bad.csv", text)
    with pytest.raises(ls.LabelParseError) as info:
        ls.Manifest.read(path, classes=["normal", "tumour"])
    message = str(info.value)
    assert "has 3 bad row(s)" in message and "on_error='skip'" in message
    assert "bad.csv:3: slide" in message and "missing.svs' does not exist" in message
    assert "bad.csv:4: label='tumor' is not one of ['normal', 'tumour']" in message and "bad.csv:5: label=''" in message
    with caplog.at_level(logging.WARNING):
        manifest = ls.Manifest.read(path, classes=["normal", "tumour"], on_error="skip")
    assert len(manifest) == 1 and len(manifest.excluded) == 3
    assert sum("skipping manifest row" in r.message for r in caplog.records) == 3
    with pytest.raises(ls.LabelParseError, match=r"r.csv:2: score='high' is not a finite number"):
        ls.Manifest.read(write_csv(manifest_dir / "r.csv", "slide,score\nsmall.svs,high"), task="regression")
    with pytest.raises(ls.ManifestError, match="no 'slide' column"):
        ls.Manifest.read(write_csv(manifest_dir / "x.csv", "path,label\nsmall.svs,1"))
    with pytest.raises(ls.SlideNotFoundError, match="manifest .*nope.csv' does not exist"):
        ls.Manifest.read(manifest_dir / "nope.csv")


# -- augmentation views -------------------------------------------------------------------


def test_orientations_are_the_eight_symmetries_and_read_box_by_box():
    image = torch.arange(2 * 3 * 5 * 7, dtype=torch.float64).reshape(2, 3, 5, 7)
    expected = [torch.rot90(image, k, (2, 3)) for k in range(4)] + [
        torch.rot90(image, k, (2, 3)).flip(3) for k in range(4)
    ]
    got = [ls.Orientation.rotation(k, flip).apply(image) for flip in (False, True) for k in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    source = ls.TensorSource(image)
    for k, flip in [(1, False), (2, True), (3, True)]:
        view = OrientedSource(source, ls.Orientation.rotation(k, flip))
        full = ls.read_all(view)
        assert torch.equal(full, ls.Orientation.rotation(k, flip).apply(image))
        h, w = view.shape[2:]
        assert torch.equal(view.read((slice(1, h - 1), slice(2, w))), full[:, :, 1 : h - 1, 2:])


def test_window_crops_and_pads_white_and_colour_is_per_pixel():
    image = torch.randint(0, 256, (1, 3, 20, 30), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    window = WindowSource(ls.TensorSource(image), offset=(-4, 5), size=(32, 16))
    full = ls.read_all(window)
    assert full.shape == (1, 3, 32, 16)
    assert torch.equal(full[:, :, 4:24], image[:, :, :, 5:21]) and (full[:, :, :4] == 255).all()
    assert (full[:, :, 24:] == 255).all()
    assert torch.equal(window.read((slice(2, 30), slice(3, 9))), full[:, :, 2:30, 3:9])
    jitter = ls.ColourJitter(brightness=1.1, contrast=0.9, saturation=1.2, hue=0.03)
    coloured = ColourSource(window, jitter)
    whole = ls.read_all(coloured)
    assert torch.equal(coloured.read((slice(5, 17), slice(1, 13))), whole[:, :, 5:17, 1:13])
    assert not torch.equal(whole, full) and torch.equal(ls.ColourJitter().apply(full), full)


# -- the dataset --------------------------------------------------------------------------


@pytest.fixture
def cmu_manifest(manifest_dir):
    return write_csv(manifest_dir / "train.csv", "slide,label\ncmu_small_region.svs,1\ncmu_small_region.svs,0")


def test_eager_and_lazy_items_are_the_same_image(cmu_manifest):
    eager = ls.SlideDataset(cmu_manifest, 4.0, input_size=(96, 80), train=True)
    lazy = ls.SlideDataset(cmu_manifest, 4.0, input_size=(96, 80), train=True, lazy=True)
    for index, epoch in [(0, 0), (1, 0), (0, 3)]:
        image, label = eager[(index, epoch)]
        source, same_label = lazy[(index, epoch)]
        assert image.shape == (3, 96, 80) and image.dtype == torch.uint8 and label == same_label == 1 - index
        assert source.shape == (1, 3, 96, 80)
        assert torch.equal(ls.read_all(source)[0], image)
        assert torch.equal(source.read((slice(10, 50), slice(33, 80)))[0], image[:, 10:50, 33:80])
    assert not torch.equal(eager[(0, 0)][0], eager[(0, 1)][0])  # another epoch, another augmentation
    assert torch.equal(eager[(0, 2)][0], eager[(0, 2)][0])


def test_training_crops_hold_tissue_and_evaluation_is_a_centred_crop(cmu_manifest):
    no_augmentation = ls.Augmentation(False, False, 0, 0, 0, 0)
    train = ls.SlideDataset(cmu_manifest, 8.0, input_size=64, train=True, augmentation=no_augmentation)
    for epoch in range(6):
        image = train[(0, epoch)][0].float().mean(dim=0)
        assert (image < 220).float().mean() > 0.05  # some tissue in every crop
    val = ls.SlideDataset(cmu_manifest, 8.0, input_size=(200, 80))
    image = val[0][0]
    layout = val.layout(0)
    height, width = layout.shape
    assert image.shape == (3, 200, 80) and height < 200 and width > 80
    top = (200 - height) - (200 - height) // 2  # centred: white above and below
    assert (image[:, :top] == 255).all() and (image[:, top + height :] == 255).all()
    rows, cols = layout.rows[0], layout.cols[0]
    left = cols[0] + (width - 80) // 2  # centred crop across
    whole = ls.Slide(val.manifest.rows[0].slide).read(8.0)
    assert torch.equal(image[:, top : top + height], whole[:, rows[0] : rows[1], left : left + 80])


def test_bad_slides_raise_or_are_skipped_counted_and_reported(manifest_dir, caplog):
    path = write_csv(
        manifest_dir / "mixed.csv", "slide,label\nsmall.svs,0\nunreadable.svs,1\nunopenable.tiff,1\nsmall.svs,1"
    )
    strict = ls.SlideDataset(path, 0.5, input_size=8, tissue=None)
    assert strict[0][0].shape == (3, 8, 8)
    with pytest.raises(ls.SlideReadError, match="unreadable.svs.*could not decode"):
        strict[1]
    with pytest.raises(ls.SlideOpenError, match="unopenable.tiff.*Unsupported TIFF compression"):
        strict[2]
    skipping = ls.SlideDataset(path, 0.5, input_size=8, tissue=None, on_error="skip")
    with caplog.at_level(logging.WARNING):
        labels = [int(skipping[i][1]) for i in range(4)]
    assert labels == [0, 1, 1, 1]  # 1 and 2 replaced by 3 (the next good sample)
    warnings = [r.message for r in caplog.records if "skipping" in r.message]
    assert len(warnings) == 2 and "unreadable.svs" in warnings[0] and "unopenable.tiff" in warnings[1]
    assert skipping.take_skipped() == 2 and skipping.take_skipped() == 0  # two requests replaced
    # through a DataLoader with workers: counted across processes, reported when the epoch ends
    data = ls.SlideDataModule(train=path, spacing=0.5, input_size=8, batch_size=2, tissue=None, on_error="skip",
                              num_workers=2)  # fmt: skip
    data.setup("fit")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        batches = list(data.train_dataloader())
    assert sum(len(y) for _, y in batches) == 4
    report = [r.message for r in caplog.records if "bad sample(s) skipped" in r.message]
    assert len(report) == 1 and "train data (mixed.csv): 2 bad sample(s) skipped and replaced in epoch 0" in report[0]


def test_augmentation_does_not_depend_on_workers(cmu_manifest):
    dataset = ls.SlideDataset(cmu_manifest, 8.0, input_size=48, train=True)
    sampler = ls.EpochSampler(dataset, seed=3)
    sampler.set_epoch(5)
    batches = [
        torch.cat([x for x, _ in DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=n,
                                            collate_fn=ls.collate_slides)])  # fmt: skip
        for n in (0, 2)
    ]
    assert torch.equal(batches[0], batches[1])
    assert torch.equal(batches[0][0], dataset[next(iter(sampler))][0])


# -- samplers and batching ----------------------------------------------------------------


def test_epoch_sampler_shards_disjointly_and_reshuffles():
    shares = []
    for rank in range(3):
        sampler = ls.EpochSampler(range(10), num_replicas=3, rank=rank, seed=1)
        sampler.set_epoch(4)
        shares.append(list(sampler))
    assert all(epoch == 4 for share in shares for _, epoch in share)
    indices = [i for share in shares for i, _ in share]
    assert len(indices) == 12 and set(indices) == set(range(10))  # padded to 4 per rank, all covered
    again = ls.EpochSampler(range(10), num_replicas=3, rank=0, seed=1)
    again.set_epoch(5)
    assert [i for i, _ in again] != [i for i, _ in shares[0]]
    assert isinstance(again, torch.utils.data.DistributedSampler)  # Lightning keeps it under DDP


def test_class_balanced_sampler_balances_and_agrees_across_ranks():
    labels = [0] * 90 + [1] * 10
    draws = []
    for rank in range(2):
        sampler = ls.ClassBalancedSampler(labels, num_samples=2000, num_replicas=2, rank=rank, seed=7)
        sampler.set_epoch(1)
        draws.append([i for i, _ in sampler])
        assert len(sampler) == 1000 == len(draws[-1])
    chosen = torch.tensor(draws[0] + draws[1])
    minority = (chosen >= 90).float().mean()
    assert 0.45 < minority < 0.55  # 10% of the data, half of the draws
    single = ls.ClassBalancedSampler(labels, num_samples=2000, seed=7)
    single.set_epoch(1)
    assert sorted(i for i, _ in single) == sorted(chosen.tolist())  # the same draw, shared out


def test_collate_stacks_images_and_sources_and_refuses_mixed_sizes():
    a = torch.zeros(3, 4, 5, dtype=torch.uint8)
    images, labels = ls.collate_slides([(a, 0), (a + 1, 1)])
    assert images.shape == (2, 3, 4, 5) and labels.dtype == torch.int64 and labels.tolist() == [0, 1]
    with pytest.raises(ValueError, match="different sizes .* set input_size"):
        ls.collate_slides([(a, 0), (torch.zeros(3, 5, 5, dtype=torch.uint8), 1)])
    sources, targets = ls.collate_slides([(ls.TensorSource(a[None]), torch.tensor([0.5])),
                                          (ls.TensorSource(a[None] + 1), torch.tensor([1.5]))])  # fmt: skip
    assert isinstance(sources, ls.StackedSource) and sources.shape == (2, 3, 4, 5) and targets.shape == (2, 1)
    assert torch.equal(sources.read((slice(1, 3), slice(0, 5)))[1], a[:, 1:3] + 1)
    with pytest.raises(ValueError, match="different shapes"):
        ls.StackedSource([ls.TensorSource(a[None]), ls.TensorSource(a[None, :, :3])])


# -- statistics and normalisation ---------------------------------------------------------


def test_channel_mean_std_is_exact_over_tensors_and_sources():
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, 17), dtype=torch.uint8, generator=generator) for h in (9, 30)]
    mean, std = ls.channel_mean_std([images[0], (ls.TensorSource(images[1][None]), 1)], rows_per_read=7)
    pixels = torch.cat([i.flatten(1) for i in images], dim=1).double() / 255
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), pixels.mean(1))
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), pixels.std(1, unbiased=False))
    normalise = ls.Uint8Normalize(mean, std)
    out = normalise(images[0][None])
    assert out.dtype == torch.float32
    mean_t, std_t = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    expected = (images[0].double() / 255 - mean_t[:, None, None]) / std_t[:, None, None]
    torch.testing.assert_close(out[0].double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="std > 0"):
        ls.Uint8Normalize([0.5], [0.0])


def test_uint8_normalize_refuses_0_255_statistics_and_float_tiles():
    with pytest.raises(ValueError, match=r"look like 0-255 values. Divide them by 255: Uint8Normalize\(\[0.485, "):
        ls.Uint8Normalize([123.675, 116.28, 103.53], [58.395, 57.12, 57.375])
    normalise = ls.Uint8Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    with pytest.raises(ValueError, match="got a torch.float32 tile: normalising it would divide by 255 again"):
        normalise(torch.rand(1, 3, 4, 4))
    white = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    torch.testing.assert_close(normalise(white), torch.full((1, 3, 2, 2), 2.0))  # (1 - 0.5) / 0.25


def test_stats_command_prints_mean_and_std(cmu_manifest, capsys):
    import json

    from lightning_streaming.data.stats import main

    assert main([str(cmu_manifest), "--spacing", "16"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["slides"] == 2 and len(result["mean"]) == 3 and all(0.5 < m < 0.9 for m in result["mean"])


def test_datamodule_shares_samples_between_processes(cmu_manifest, manifest_dir):
    from types import SimpleNamespace

    path = write_csv(manifest_dir / "five.csv", "slide,label\n" + "cmu_small_region.svs,0\n" * 3 + "small.svs,1\n" * 2)
    seen = {}
    for balanced in (False, True):
        for rank in range(2):
            data = ls.SlideDataModule(train=path, spacing=16.0, input_size=8, tissue=None, balanced=balanced, seed=4)
            data.trainer = SimpleNamespace(world_size=2, global_rank=rank)  # what Lightning sets under DDP
            sampler = data.train_dataloader().sampler
            sampler.set_epoch(2)
            seen[balanced, rank] = [index for index, epoch in sampler if epoch == 2]
    assert len(seen[False, 0]) == len(seen[False, 1]) == 3
    assert set(seen[False, 0] + seen[False, 1]) == set(range(5))  # disjoint shares (one padded), all covered
    assert len(seen[True, 0]) == len(seen[True, 1]) == 3
    with pytest.raises(ValueError, match="balanced=True needs task='classification'"):
        ls.SlideDataModule(train=path, spacing=16.0, balanced=True, task="regression")
    with pytest.raises(ValueError, match="batch_size > 1 needs input_size"):
        ls.SlideDataModule(train=path, spacing=16.0, batch_size=2)
