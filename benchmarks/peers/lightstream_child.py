"""One lightstream 1.0.7 measurement in a fresh process, run with the peer venv's python
(``benchmarks/peers/setup_lightstream.sh`` creates it) by ``benchmarks/vs_lightstream.py``:

    results/peers/venv-lightstream/bin/python benchmarks/peers/lightstream_child.py SPEC_JSON

It drives lightstream through its public entry point, ``StreamingModule(trunk, tile_size,
...)`` (``StreamingConstructor`` -> ``StreamingCNN``), the way its ``ImageNetClassifier``
training step does: ``out = sCNN.forward(image)`` (no graph), ``out.requires_grad = True``,
head and loss backward, then ``sCNN.backward(image, out.grad)`` recomputes tile by tile.

Settings, all lightstream's own arguments: ``normalize_on_gpu=False`` (the image is
already normalised, as ours is), ``copy_to_gpu=False``, ``statistics_on_cpu=True`` (its
default; needs the CPU patch), ``verbose=False``, ``saliency=`` the spec's ``input_grad``,
``add_keep_modules=[nn.BatchNorm2d]`` when the trunk has BatchNorm (as its
``StreamingResNet`` does, so that BatchNorm is applied while the tile statistics are
computed), and ``tile_cache_path`` in a fresh temporary folder: lightstream saves its tile
statistics to ``tile_cache_1_3_<tile>_<tile>`` in the working directory and reloads that
file for *any* trunk with the same tile size, so without a fresh path a measurement would
time a cache load, or use another trunk's statistics.

Prints one line, ``RESULT_PREFIX`` + JSON (see ``vs_common.measurement``), or the same with
``error`` set to the exception's type and message when lightstream fails.
"""

from __future__ import annotations

import importlib.metadata as metadata
import math
import shutil
import sys
import tempfile
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for vs_common and bench_networks

import torch  # noqa: E402
from torch import nn  # noqa: E402

import vs_common as common  # noqa: E402


def lightstream_geometry(sc: Any, height: int, width: int) -> dict[str, Any]:
    """Tile counts of lightstream's forward and backward loops for this image, with the
    formulas of ``StreamingCNN.forward`` and ``StreamingCNN.backward``, and what its
    statistics found. Every tile is a tile_size x tile_size crop of the image (smaller only
    where the image is smaller), so tiles x tile area / image area is its overlap factor."""
    tile_h, tile_w = sc.tile_shape[2], sc.tile_shape[3]
    out_lost, grad_lost, stride = sc.tile_output_lost, sc.tile_gradient_lost, sc.output_stride
    tile_out = sc._tile_output_shape
    valid_h = tile_out[2] - out_lost.top - out_lost.bottom
    valid_w = tile_out[3] - out_lost.left - out_lost.right
    out_h = (height - tile_h) // int(stride[1]) + tile_out[2]
    out_w = (width - tile_w) // int(stride[2]) + tile_out[3]
    rows = 1 if height <= tile_h else math.ceil(out_h / valid_h)
    cols = 1 if width <= tile_w else math.ceil(out_w / valid_w)
    grad_h = (tile_h - grad_lost.top - grad_lost.bottom) // int(stride[1]) * int(stride[1])
    grad_w = (tile_w - grad_lost.left - grad_lost.right) // int(stride[2]) * int(stride[2])
    back_rows = 1 if height <= tile_h else math.ceil((height - grad_lost.top - grad_lost.bottom) / grad_h)
    back_cols = 1 if width <= tile_w else math.ceil((width - grad_lost.left - grad_lost.right) / grad_w)
    area = min(tile_h, height) * min(tile_w, width)
    return {
        "grid": [rows, cols],
        "n_tiles": rows * cols,
        "backward_grid": [back_rows, back_cols],
        "backward_tiles": back_rows * back_cols,
        "halo_factor": rows * cols * area / (height * width),
        "largest_region": [min(tile_h, height), min(tile_w, width)],
        "lightstream_output_lost": [out_lost.top, out_lost.left, out_lost.bottom, out_lost.right],
        "lightstream_gradient_lost": [grad_lost.top, grad_lost.left, grad_lost.bottom, grad_lost.right],
        "lightstream_output_stride": [int(s) for s in stride],
    }


def run(spec: common.RunSpec) -> dict[str, Any]:
    from lightstream.modules.streaming import StreamingModule

    memory = common.Memory()
    trunk, head = common.build(spec)
    has_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in trunk.modules())
    cache_dir = Path(tempfile.mkdtemp(prefix="lightstream_tile_cache_"))
    state: dict[str, Any] = {}

    def prepare() -> Any:
        module = StreamingModule(
            trunk,
            spec.tile_size,
            tile_cache_path=str(cache_dir / "tile_cache"),
            verbose=False,
            saliency=spec.input_grad,
            copy_to_gpu=False,
            statistics_on_cpu=True,
            normalize_on_gpu=False,
            add_keep_modules=[nn.BatchNorm2d] if has_norm else None,
        )
        state["sc"] = module.stream_network
        return module.stream_network

    def step(sc: Any, x: torch.Tensor) -> tuple[common.StepTimes, torch.Tensor]:
        out, forward_s = common.timed(lambda: sc.forward(x))

        def backward() -> None:
            out.requires_grad_(True)
            head(out).backward()
            sc.backward(x, out.grad)

        _, backward_s = common.timed(backward)
        return common.StepTimes(forward_s, backward_s), out.detach()

    def collect(sc: Any, x: torch.Tensor) -> dict[str, Any]:
        return {
            "trunk": common.grads_of(sc.stream_module),
            "head": common.grads_of(head),
            "input": sc.saliency_map if spec.input_grad else None,
        }

    try:
        result = common.measurement(spec, memory, prepare, step, collect, image_requires_grad=False)
        result |= lightstream_geometry(state["sc"], spec.height, spec.width)
    except Exception as error:  # a refusal or a crash of the peer is a result, reported as such
        result = asdict(spec)
        result["error"] = f"{type(error).__name__}: {error}"
        result["traceback_tail"] = traceback.format_exc().strip().splitlines()[-24:]
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    result["peer_version"] = metadata.version("lightstream")
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    common.emit(run(common.RunSpec.from_json(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
