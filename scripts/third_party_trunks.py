"""Give trunks cut from torchvision, timm and MONAI models to ``lightning_streaming.verify``
and print which stream exactly, which are refused (and why), and which fail.

Not part of the test suite: those libraries cannot be installed beside the pinned CPU torch
(PyPI's torchvision does not load with it). Run it in an environment of its own, e.g.::

    python -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 \\
        timm monai pytorch-lightning torchmetrics numpy
    PYTHONPATH=. /tmp/tv/bin/python scripts/third_party_trunks.py [--only NAME ...] [--markdown out.md]

Every trunk runs in float64 on random weights (norm statistics randomised, eval mode), on an
awkward input size with a tile small enough for several tiles, and must match the
conventional computation to a relative 1e-8 (outputs, parameter and input gradients).
Expected refusals (squeeze-excitation, attention, GroupNorm, TensorFlow 'same' padding,
global pooling) are listed as such: the check is that nothing is silently wrong.
"""

from __future__ import annotations

import argparse
import time
import traceback
from typing import Callable

import torch
from torch import nn

import lightning_streaming as ls


def randomise(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.uniform_(-0.3, 0.3, generator=generator)
            module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model.eval()


class Take(nn.Module):
    """The first ``count`` children of a sequential part of a model, as one trunk."""

    def __init__(self, *modules: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*modules)

    def forward(self, x):
        return self.body(x)


def torchvision_cases() -> dict[str, Callable[[], tuple[nn.Module, tuple, object]]]:
    import torchvision.models as tv
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.video import r3d_18

    def children(model: nn.Module, last: str) -> nn.Module:
        return ls.split_at(model, last)[0]

    return {
        "tv/resnet18:layer3": lambda: (children(tv.resnet18(), "layer3"), (2, 3, 150, 131), 96),
        "tv/resnet50:layer2": lambda: (children(tv.resnet50(), "layer2"), (1, 3, 133, 150), 96),
        "tv/resnext50_32x4d:layer2": lambda: (children(tv.resnext50_32x4d(), "layer2"), (1, 3, 101, 117), 80),
        "tv/wide_resnet50_2:layer1": lambda: (children(tv.wide_resnet50_2(), "layer1"), (1, 3, 97, 83), 64),
        "tv/vgg11:features": lambda: (tv.vgg11().features, (1, 3, 121, 99), 80),
        "tv/squeezenet1_1:features": lambda: (tv.squeezenet1_1().features, (1, 3, 119, 97), 80),
        "tv/densenet121:features[:6]": lambda: (tv.densenet121().features[:6], (1, 3, 109, 98), 80),
        "tv/mobilenet_v2:features[:8]": lambda: (tv.mobilenet_v2().features[:8], (2, 3, 131, 117), 96),
        "tv/mobilenet_v3_large:features[:4]": lambda: (tv.mobilenet_v3_large().features[:4], (1, 3, 99, 87), 64),
        "tv/mobilenet_v3_large:features[:5] (SE)": lambda: (tv.mobilenet_v3_large().features[:5], (1, 3, 99, 87), 64),
        "tv/mnasnet1_0:layers[:9]": lambda: (tv.mnasnet1_0().layers[:9], (1, 3, 99, 101), 72),
        "tv/shufflenet_v2_x1_0:stage3": lambda: (children(tv.shufflenet_v2_x1_0(), "stage3"), (2, 3, 127, 119), 96),
        "tv/efficientnet_v2_s:features[:4]": lambda: (tv.efficientnet_v2_s().features[:4], (1, 3, 97, 111), 80),
        "tv/efficientnet_b0:features[:3] (SE)": lambda: (tv.efficientnet_b0().features[:3], (1, 3, 97, 111), 80),
        "tv/convnext_tiny:features[:4]": lambda: (tv.convnext_tiny().features[:4], (1, 3, 133, 121), 112),
        "tv/regnet_x_400mf:trunk_output[:2]": lambda: (
            Take(tv.regnet_x_400mf().stem, *tv.regnet_x_400mf().trunk_output[:2]), (1, 3, 111, 97), 80),
        "tv/regnet_y_400mf:block1 (SE)": lambda: (
            Take(tv.regnet_y_400mf().stem, tv.regnet_y_400mf().trunk_output[0]), (1, 3, 111, 97), 80),
        "tv/googlenet:inception3a": lambda: (
            children(tv.googlenet(aux_logits=False, init_weights=True), "inception3b"), (1, 3, 129, 131), 112),
        "tv/swin_t:features[:2] (attention)": lambda: (tv.swin_t().features[:2], (1, 3, 128, 128), 64),
        "tv/resnet18+fpn (dict of levels)": lambda: (
            resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5), (1, 3, 256, 320), 224),
        "tv/fcn_resnet50:backbone (dilated)": lambda: (
            Take(*list(tv.segmentation.fcn_resnet50(weights=None, weights_backbone=None).backbone.children())[:6]),
            (1, 3, 105, 97), 96),
        "tv/deeplabv3 head (ASPP)": lambda: (
            tv.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None).classifier, (1, 2048, 33, 31), 24),
        "tv/r3d_18:layer1 (3D)": lambda: (children(r3d_18(), "layer1"), (1, 3, 13, 43, 39), (12, 32, 32)),
    }


def timm_cases() -> dict[str, Callable[[], tuple[nn.Module, tuple, object]]]:
    import timm

    def features(name: str, indices: tuple, shape: tuple, tile) -> Callable:
        return lambda: (timm.create_model(name, features_only=True, out_indices=indices, pretrained=False), shape, tile)

    cases = {
        "timm/resnet50d:features(1,2)": features("resnet50d", (1, 2), (1, 3, 131, 117), 112),
        "timm/regnetx_002:features(0,1,2)": features("regnetx_002", (0, 1, 2), (1, 3, 115, 101), 96),
        "timm/dpn68:features(0,1)": features("dpn68", (0, 1), (1, 3, 99, 101), 80),
        "timm/densenet121:features(0,1)": features("densenet121", (0, 1), (1, 3, 109, 99), 80),
        "timm/res2net50_26w_4s:features(0,1)": features("res2net50_26w_4s", (0, 1), (1, 3, 97, 111), 80),
        "timm/cspresnet50:features(0,1,2)": features("cspresnet50", (0, 1, 2), (1, 3, 111, 97), 96),
        "timm/repvgg_a2:features(0,1)": features("repvgg_a2", (0, 1), (1, 3, 97, 89), 64),
        "timm/xception41:features(1,2)": features("xception41", (1, 2), (1, 3, 99, 101), 80),
        "timm/mobilenetv4_conv_small:features(0,1,2)": features("mobilenetv4_conv_small", (0, 1, 2), (1, 3, 99, 111), 80),
        "timm/efficientnetv2_rw_s:features(0,1)": features("efficientnetv2_rw_s", (0, 1), (1, 3, 101, 97), 80),
        "timm/ghostnet_100:features(0,1)": features("ghostnet_100", (0, 1), (1, 3, 97, 99), 64),
        "timm/inception_next_tiny:features(0)": features("inception_next_tiny", (0,), (1, 3, 131, 117), 112),
        "timm/convnext_atto:features(0,1)": features("convnext_atto", (0, 1), (1, 3, 133, 121), 112),
        "timm/convnextv2_atto (GRN)": features("convnextv2_atto", (0,), (1, 3, 133, 121), 112),
        "timm/efficientnet_b0:features(0,1) (SE)": features("efficientnet_b0", (0, 1), (1, 3, 97, 111), 80),
        "timm/tf_efficientnet_b0 (TF same)": features("tf_efficientnet_b0", (0,), (1, 3, 97, 111), 80),
        "timm/hrnet_w18_small:features(0,1,2)": features("hrnet_w18_small", (0, 1, 2), (1, 3, 128, 160), 128),
        "timm/mixnet_s:features(0,1)": features("mixnet_s", (0, 1), (1, 3, 97, 111), 80),
        "timm/edgenext_xx_small:features(0)": features("edgenext_xx_small", (0,), (1, 3, 128, 112), 96),
        "timm/fastvit_t8:features(0)": features("fastvit_t8", (0,), (1, 3, 128, 112), 96),
    }
    return cases


def monai_cases() -> dict[str, Callable[[], tuple[nn.Module, tuple, object]]]:
    from monai.networks.nets import AttentionUnet, BasicUNet, DynUNet, SegResNet, UNet

    return {
        "monai/UNet 2D (batch norm)": lambda: (
            UNet(2, 3, 2, (8, 16, 32), (2, 2), norm="batch"), (1, 3, 96, 80), 72),
        "monai/UNet 3D (batch norm)": lambda: (
            UNet(3, 1, 2, (4, 8, 16), (2, 2), norm="batch"), (1, 1, 32, 40, 36), 28),
        "monai/UNet 1D (batch norm)": lambda: (UNet(1, 2, 2, (4, 8), (2,), norm="batch"), (2, 2, 200), 64),
        "monai/BasicUNet 2D (batch norm)": lambda: (
            BasicUNet(2, 3, 2, features=(4, 4, 8, 8, 16, 4), norm="batch"), (1, 3, 96, 80), 88),
        "monai/AttentionUnet 2D": lambda: (AttentionUnet(2, 3, 2, (4, 8, 16), (2, 2)), (1, 3, 96, 80), 80),
        "monai/DynUNet 2D (batch)": lambda: (
            DynUNet(2, 3, 2, [3, 3, 3], [1, 2, 2], [2, 2], norm_name="batch"), (1, 3, 96, 80), 72),
        "monai/UNet 2D (instance norm)": lambda: (UNet(2, 3, 2, (8, 16), (2,)), (1, 3, 64, 64), 48),
        "monai/SegResNet (GroupNorm)": lambda: (SegResNet(2, 8, 3, 2), (1, 3, 64, 64), 48),
    }


def tiled_case(trunk: nn.Module, shape: tuple, tile) -> tuple[tuple, tuple]:
    """``shape`` (grown if needed) and a tile a little above the smallest usable one, so
    that the image is really cut into several tiles."""
    for _ in range(10):
        try:
            ls.tile_plan(trunk, shape, 1)
            smallest = (1,) * (len(shape) - 2)
        except ls.TileTooSmallError as error:
            smallest = error.minimum_tile
        except ls.NotLocalError:
            raise
        except ValueError:  # a size this trunk does not accept (an FPN wants multiples of 32): the next one
            shape = shape[:2] + tuple((n + 31) // 32 * 32 for n in shape[2:])
            continue
        tile = tuple(m + 9 for m in smallest)
        if any(t < n for t, n in zip(tile, shape[2:])):
            return shape, tile
        shape = shape[:2] + tuple(int(n * 1.6) // 32 * 32 + 7 for n in shape[2:])  # awkward on purpose
    return shape, tile


def run(name: str, make: Callable) -> tuple[str, str, float]:
    start = time.perf_counter()
    try:
        trunk, shape, tile = make()
        trunk = randomise(trunk)
        shape, tile = tiled_case(trunk, shape, tile)
        report = ls.verify(trunk, shape, tile, raise_on_mismatch=False)
        tiles = len(report.plan)
        if report.worst <= 1e-8:
            return "exact", f"worst {report.worst:.1e}, {shape} in {tiles} tiles of {tile}", start
        return "WRONG", f"worst {report.worst:.1e}\n{report}", start
    except ls.NotLocalError as error:
        return "refused", str(error).splitlines()[0][:400], start
    except ls.TileTooSmallError as error:
        return "tile too small", str(error)[:300], start
    except Exception as error:  # noqa: BLE001 - report every failure
        return "ERROR", f"{type(error).__name__}: {error}\n{traceback.format_exc()[-1500:]}", start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="substrings of case names to run")
    parser.add_argument("--markdown", help="also write the table here")
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = {}
    for source in (torchvision_cases, timm_cases, monai_cases):
        try:
            cases.update(source())
        except ImportError as error:
            print(f"skipping {source.__name__}: {error}")
    rows = []
    for name, make in cases.items():
        if args.only and not any(o in name for o in args.only):
            continue
        verdict, detail, start = run(name, make)
        seconds = time.perf_counter() - start
        rows.append((name, verdict, detail, seconds))
        print(f"{verdict:>14}  {name:<48} {seconds:6.1f}s  {detail.splitlines()[0] if detail else ''}", flush=True)
        if verdict in ("ERROR", "WRONG"):
            print(detail)
    counts = {}
    for _, verdict, _, _ in rows:
        counts[verdict] = counts.get(verdict, 0) + 1
    print("summary:", counts)
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write("| trunk | result | detail |\n|---|---|---|\n")
            for name, verdict, detail, _ in rows:
                out.write(f"| {name} | {verdict} | {detail.splitlines()[0].replace('|', '/')} |\n")


if __name__ == "__main__":
    main()
