"""Run in a fresh interpreter by test_lightning_packages.py, once per Lightning package:

    python lightning_package_worker.py lightning|pytorch_lightning|both SLIDES_JSON WORK_DIR

``lightning`` and ``pytorch_lightning`` block the other package (``sys.modules[name] = None``,
as if it were not installed) and import ``lightning_streaming`` first, so our strategy names
reach the registry through the post-import hook; ``both`` imports both packages first. Each
check prints ``ok <name>``; a failed assertion ends the process with a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

MODE = sys.argv[1]
BLOCKED = {"lightning": "pytorch_lightning", "pytorch_lightning": "lightning"}.get(MODE)
if BLOCKED:
    sys.modules[BLOCKED] = None  # type: ignore[assignment]
    import lightning_streaming as ls

    assert not [m for m in ("lightning", "pytorch_lightning", "lightning_fabric", "openslide") if sys.modules.get(m)]
    if MODE == "lightning":
        import lightning.pytorch as P
    else:
        import pytorch_lightning as P
else:
    import lightning.pytorch
    import pytorch_lightning

    import lightning_streaming as ls

    P = lightning.pytorch

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

TILE, SHAPE = 24, (48, 40)


def ok(name: str) -> None:
    print("ok", name, flush=True)


class Model(ls.StreamingMixin, P.LightningModule):
    """A streamed classifier on the package's own LightningModule; records what the trunk sees."""

    def __init__(self, mean: list[float] | None = None, std: list[float] | None = None, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1))
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8, 2))
        if mean is not None:
            self.tile_transform = ls.Uint8Normalize(mean, std)
        self.trunk_inputs: list[tuple[int, ...]] = []
        self.steps = 0
        self.trunk[0].register_forward_hook(self._record)

    def _record(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        shape = tuple(args[0].shape)
        if all(isinstance(size, int) for size in shape):  # hooks also run once in the analysis, on symbolic sizes
            self.trunk_inputs.append(shape)

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), batch_size=len(y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def batches(count: int = 2) -> list:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 3, *SHAPE, generator=generator), torch.tensor([0, 1])) for _ in range(count)]


def quiet(**overrides) -> dict:
    kwargs = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, max_epochs=1)  # fmt: skip
    return {**kwargs, **overrides}


def assert_streamed(model: Model) -> None:
    """The trunk ran on tiles: more calls than batches, each smaller than the image."""
    assert model.steps == 2 and len(model.trunk_inputs) > model.steps, model.trunk_inputs
    assert all(shape[2] < SHAPE[0] or shape[3] < SHAPE[1] for shape in model.trunk_inputs), model.trunk_inputs
    assert all(shape[2] <= TILE and shape[3] <= TILE for shape in model.trunk_inputs), model.trunk_inputs


def check_training() -> None:
    for name, strategy in (("by_name", "streaming"), ("instance", ls.StreamingStrategy(tile_size=TILE))):
        model = Model()
        model.default_tile_size = TILE  # the registry name uses default settings: the model's tile size
        trainer = P.Trainer(strategy=strategy, **quiet())
        assert isinstance(trainer.strategy, ls.StreamingStrategy)
        assert isinstance(trainer.strategy, P.strategies.SingleDeviceStrategy)
        trainer.fit(model, DataLoader(batches(), batch_size=None))
        assert_streamed(model)
        ok(f"train_{name}")


def check_ddp_names() -> None:
    for name, method in (("streaming_ddp", "popen"), ("streaming_ddp_spawn", "spawn")):
        strategy = P.Trainer(strategy=name, accelerator="cpu", devices=2, logger=False).strategy
        assert isinstance(strategy, ls.StreamingDDPStrategy) and isinstance(strategy, P.strategies.DDPStrategy)
        assert strategy._start_method == method
    ok("ddp_names")


def check_ddp_spawn() -> None:
    """Two gloo processes launched by Lightning's spawn launcher train, and the parent gets
    the trained weights back."""
    model = Model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = ls.StreamingDDPStrategy(tile_size=TILE, start_method="spawn", process_group_backend="gloo")
    P.Trainer(strategy=strategy, **quiet(devices=2)).fit(model, DataLoader(batches(4), batch_size=None))
    assert all(not torch.equal(value, initial[name]) for name, value in model.state_dict().items())
    ok("ddp_spawn")


def check_lsuv() -> None:
    model, lsuv = Model(), ls.StreamingLSUV(num_batches=2)
    assert isinstance(lsuv, P.Callback)
    P.Trainer(strategy=ls.StreamingStrategy(tile_size=TILE), callbacks=[lsuv], **quiet()).fit(
        model, DataLoader(batches(), batch_size=None)
    )
    assert [row["layer"] for row in lsuv.report] == ["0", "2"] and all(row["converged"] for row in lsuv.report)
    ok("lsuv")  # the test reads the table on stderr: shown without configuring logging


def check_checkpoints(slides: dict, work: Path) -> None:
    """A SlideDataModule run's checkpoint loads with PyTorch's defaults, rebuilds the model
    and the DataModule, and resumes."""
    manifest = work / "train.csv"
    slide = slides["cmu_small_region"]
    manifest.write_text(f"slide,label,base_spacing\n{slide},tissue,\n{slide},tissue,0.45\n{slide},zoomed,0.3\n"
                        f"{slide},zoomed,0.32\n")  # fmt: skip
    settings = dict(spacing=4.0, input_size=SHAPE, batch_size=2, tissue=ls.TissueDetection(spacing=16.0),
                    augmentation=ls.Augmentation(hue=0.01), cache_dir=work / "masks")  # fmt: skip
    data = ls.SlideDataModule(train=manifest, val=manifest, **settings)
    assert isinstance(data, P.LightningDataModule)
    checkpoint = P.callbacks.ModelCheckpoint(dirpath=work / "checkpoints", filename="last")
    lsuv = ls.StreamingLSUV(num_batches=1, verbose=False)
    strategy = ls.StreamingStrategy(tile_size=TILE, input_on_host=True)
    model = Model([0.7, 0.6, 0.7], [0.2, 0.25, 0.2])
    P.Trainer(strategy=strategy, callbacks=[checkpoint, lsuv], **quiet(enable_checkpointing=True)).fit(model, data)
    assert model.steps == 2 and len(model.trunk_inputs) > 2

    path = work / "checkpoints" / "last.ckpt"
    saved = torch.load(path)  # PyTorch's defaults: weights_only=True
    hparams = saved["datamodule_hyper_parameters"]
    assert hparams["train"] == str(manifest) and hparams["cache_dir"] == str(work / "masks")
    assert hparams["tissue"]["spacing"] == 16.0 and hparams["augmentation"]["hue"] == 0.01
    assert saved["callbacks"]["StreamingLSUV"]["calibrated"]
    restored = Model.load_from_checkpoint(path)
    for name, value in model.state_dict().items():
        assert torch.equal(value, restored.state_dict()[name]), name
    rebuilt = ls.SlideDataModule.load_from_checkpoint(path)
    assert rebuilt.tissue == settings["tissue"] and rebuilt.augmentation == settings["augmentation"]
    assert rebuilt.manifests["train"] == str(manifest)
    resumed = Model([0.7, 0.6, 0.7], [0.2, 0.25, 0.2])
    again = ls.StreamingLSUV(num_batches=1)
    trainer = P.Trainer(strategy=ls.StreamingStrategy(tile_size=TILE, input_on_host=True), callbacks=[again],
                        **quiet(max_epochs=2))  # fmt: skip
    trainer.fit(resumed, rebuilt, ckpt_path=path)
    assert resumed.steps == 2 and trainer.current_epoch == 2  # the second epoch only
    assert again.report == lsuv.report
    ok("checkpoints")


def check_predict(slides: dict, work: Path) -> None:
    """The checkpoint records classes and spacing from the DataModule; the model loads with
    ls.load_model and predicts an unlabelled manifest through PredictionWriter (this
    package's BasePredictionWriter)."""
    path = work / "checkpoints" / "last.ckpt"
    record = torch.load(path)["lightning_streaming"]
    assert record["classes"] == ["tissue", "zoomed"] and record["spacing"] == 4.0, record
    model = ls.load_model(path, Model)
    assert ls.model_info(model).classes == ["tissue", "zoomed"] and not model.training
    manifest = work / "predict.csv"
    manifest.write_text(f"slide\n{slides['cmu_small_region']}\n")
    data = ls.SlideDataModule(predict=manifest, spacing=16.0, tissue=None)
    writer = ls.PredictionWriter(work / "predictions")
    assert isinstance(writer, P.callbacks.BasePredictionWriter)
    trainer = P.Trainer(strategy=ls.StreamingStrategy(tile_size=TILE), callbacks=[writer], **quiet())
    outputs = trainer.predict(model, data)
    assert outputs[0]["slides"] == [slides["cmu_small_region"]] and outputs[0]["probabilities"].shape == (1, 2)
    lines = (work / "predictions" / "predictions.csv").read_text().splitlines()
    assert lines[0] == "slide,label,p_tissue,p_zoomed,spacing_um" and len(lines) == 2, lines
    ok("predict")


def check_both_packages() -> None:
    """Both packages imported: each Trainer takes its own variant, and every variant is an
    instance of the public names."""
    for package in (lightning.pytorch, pytorch_lightning):
        assert "streaming" in package.strategies.StrategyRegistry.available_strategies()
        strategy = ls.StreamingStrategy.for_package(package)(tile_size=TILE)
        assert isinstance(strategy, package.strategies.Strategy)
        assert isinstance(strategy, ls.StreamingStrategy.for_package(lightning.pytorch))
        assert isinstance(strategy, ls.StreamingStrategy.for_package(pytorch_lightning))
        assert type(package.Trainer(strategy="streaming", logger=False).strategy) is type(strategy)
    # The calling code decides: its globals name one package.
    for package in (lightning.pytorch, pytorch_lightning):
        namespace = {"ls": ls, "P": package}
        exec("chosen = ls.StreamingStrategy(tile_size=8)._lightning_package", namespace)
        assert namespace["chosen"] == package.__name__, (namespace["chosen"], package.__name__)
    assert ls.StreamingStrategy._lightning_package == "lightning.pytorch"  # this module names both: lightning
    ok("both")


if __name__ == "__main__":
    slides_json, work_dir = sys.argv[2], Path(sys.argv[3])
    torch.set_num_threads(1)
    logging.getLogger("lightning_streaming").setLevel(logging.WARNING)
    if MODE == "both":
        check_both_packages()
    else:
        check_training()
        check_ddp_names()
        check_lsuv()
        check_checkpoints(json.loads(slides_json), work_dir)
        check_predict(json.loads(slides_json), work_dir)
        if MODE == "lightning":
            check_ddp_spawn()
