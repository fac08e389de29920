"""Our own logic of benchmarks/vs_lightstream.py: the ResNet-18 definition, our side of a
measurement, the gradient comparison, the report's aggregation and verdicts, the peer's
tile-count formulas, the CPU patch of lightstream's source and the shared child-process
runner. None of it needs the lightstream venv or the network."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(BENCHMARKS / "peers"))

import bench_networks  # noqa: E402
import child_process  # noqa: E402
import lightstream_child  # noqa: E402  (imports lightstream only inside run())
import patch_lightstream_cpu  # noqa: E402
import vs_common as common  # noqa: E402
import vs_lightstream  # noqa: E402
import vs_report as report  # noqa: E402


# --- the ResNet-18 trunk -----------------------------------------------------------------


def test_resnet18_has_torchvisions_parameter_count_and_names():
    net = bench_networks.ResNet18()
    assert sum(p.numel() for p in net.parameters()) == 11_689_512
    names = [name for name, _ in net.named_parameters()]
    assert len(names) == 62  # torchvision's resnet18: 62 parameter tensors
    for name in ("conv1.weight", "bn1.bias", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                 "layer2.0.downsample.1.weight", "layer4.1.bn2.bias", "fc.weight", "fc.bias"):  # fmt: skip
        assert name in names
    assert "layer1.0.downsample.0.weight" not in names  # layer1 keeps the identity shortcut
    assert len(net.state_dict()) == 122  # with running_mean / running_var / num_batches_tracked


def test_resnet18_layer_shapes_and_classifier_output():
    net = bench_networks.ResNet18().eval()
    shapes = {}
    hooks = [getattr(net, n).register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape)))
             for n in ("conv1", "maxpool", "layer1", "layer2", "layer3", "layer4")]  # fmt: skip
    with torch.no_grad():
        logits = net(torch.randn(1, 3, 224, 224))
    for hook in hooks:
        hook.remove()
    assert logits.shape == (1, 1000)
    assert shapes == {
        "conv1": (1, 64, 112, 112), "maxpool": (1, 64, 56, 56), "layer1": (1, 64, 56, 56),
        "layer2": (1, 128, 28, 28), "layer3": (1, 256, 14, 14), "layer4": (1, 512, 7, 7),
    }  # fmt: skip
    assert net.conv1.kernel_size == (7, 7) and net.conv1.stride == (2, 2) and net.conv1.bias is None


def test_resnet18_trunk_is_eval_mode_frozen_norm_and_seeded():
    trunk, head = bench_networks.build("resnet18", seed=3)
    again, _ = bench_networks.build("resnet18", seed=3)
    assert not trunk.training
    norms = [m for m in trunk.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(not p.requires_grad for m in norms for p in m.parameters())
    assert all(not torch.allclose(m.running_var, torch.ones_like(m.running_var)) for m in norms)
    assert all(torch.equal(a, b) for a, b in zip(trunk.state_dict().values(), again.state_dict().values()))
    assert head.linear.in_features == 512
    assert trunk(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)


# --- our side of a measurement -------------------------------------------------------------


def spec(**changes) -> common.RunSpec:
    base = dict(library="ours", network="table1", height=48, width=48, tile_size=24, dtype="float64")
    return common.RunSpec(**(base | changes))


def test_our_child_streams_exactly_and_reports_every_field():
    result = vs_lightstream.our_child(spec(input_grad=True))
    assert "error" not in result
    for name in ("prepare_s", "forward_s", "backward_s", "step_s", "idle_mib", "peak_mib", "process_peak_mib",
                 "load_1min", "n_tiles", "halo_factor"):  # fmt: skip
        assert name in result
    assert result["n_tiles"] > 1 and result["halo_factor"] > 1.0
    for kind in ("weight", "bias", "head", "input"):
        assert result[f"grad_{kind}_maxdiff"] <= 1e-12 * max(result[f"grad_{kind}_scale"], 1.0)
    assert result["output_maxdiff"] <= 1e-12


def test_our_child_reports_a_refusal_as_an_error():
    result = vs_lightstream.our_child(spec(tile_size=2))  # smaller than one output pixel's receptive field
    assert "TileTooSmallError" in result["error"]


def test_compare_flags_a_wrong_gradient_missing_parameter_and_input():
    s = spec(network="norm-trainable", height=16, width=16, tile_size=16)
    torch.manual_seed(0)
    x = common.make_input(s)
    reference = common.conventional_reference(s, x, input_grad=True)
    trunk_grads = {name: g.clone() for name, g in reference["trunk"].items()}
    exact = common.compare(reference, reference["output"], trunk_grads, reference["head"], reference["input"])
    assert exact["grad_norm_maxdiff"] == 0 and exact["grad_weight_maxdiff"] == 0 and "missing_grads" not in exact
    norm_name = next(n for n, kind in reference["categories"].items() if kind == "norm")
    trunk_grads[norm_name] = trunk_grads[norm_name] + 0.5
    del trunk_grads["0.weight"]
    wrong = common.compare(reference, reference["output"][..., :-1], trunk_grads, reference["head"], None)
    assert wrong["grad_norm_maxdiff"] == pytest.approx(0.5)
    assert wrong["missing_grads"] == ["0.weight"]
    assert wrong["grad_weight_maxdiff"] == pytest.approx(reference["trunk"]["0.weight"].abs().max().item())
    assert "output_shape_mismatch" in wrong and wrong["input_grad_error"] == "no input gradient"


def test_memory_phases_have_their_own_peaks():
    memory = common.Memory()
    if not memory.resettable:
        pytest.skip("/proc/self/clear_refs is not writable here")
    memory.reset()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    first = memory.phase_peak()
    del block
    memory.reset()
    second = memory.phase_peak()
    assert first - second > 40
    assert memory.process_peak >= first


# --- the report ----------------------------------------------------------------------------


def run(library: str, repeat: int, step: float, peak: float, **extra) -> dict:
    return {"network": "vgg", "height": 2048, "tile_size": 1024, "library": library, "role": "main",
            "group": f"main-vgg-2048-r{repeat}", "repeat": repeat, "step_s": step, "forward_s": step / 3,
            "backward_s": 2 * step / 3, "prepare_s": 0.1, "peak_mib": peak, "idle_mib": 150.0, "before_prepare_mib": 100.0,
            "prepare_peak_mib": 100.0, "process_peak_mib": peak, "load_1min": 1.0} | extra  # fmt: skip


def test_aggregate_pairs_runs_of_the_same_repeat():
    results = [
        run("conventional", 0, 10.0, 1100), run("ours", 0, 12.0, 300), run("lightstream", 0, 36.0, 400),
        run("conventional", 1, 20.0, 1100), run("ours", 1, 30.0, 300), run("lightstream", 1, 60.0, 500),
        run("lightstream", 2, 1.0, 1.0, error="RuntimeError: boom"),
    ]  # fmt: skip
    rows = report.aggregate(results)
    peer = rows[("vgg", 2048, 1024, "lightstream")]
    assert len(peer.runs) == 2  # the failed run is left out
    assert sorted(peer.vs_ours) == [2.0, 3.0] and sorted(peer.vs_conventional) == [3.0, 3.6]
    assert sorted(peer.memory_vs_ours) == [1.5, 2.0]
    assert rows[("vgg", 2048, 1024, "ours")].vs_conventional == [1.2, 1.5]
    speed = report.speed_verdict(rows, "vgg", 2048, 1024)
    assert speed.value == pytest.approx(2.5) and speed.met
    memory = report.memory_verdict(rows, "vgg", 2048, 1024)
    assert memory.value == pytest.approx(200 / 350) and memory.met
    table = report.time_memory_table(rows, [r for r in results if "error" in r])
    assert "RuntimeError: boom" in table and "| 2.50 |" in table


def test_speed_verdict_misses_when_the_peer_is_not_twice_as_slow():
    rows = report.aggregate([run("ours", 0, 10.0, 300), run("lightstream", 0, 15.0, 200)])
    assert report.speed_verdict(rows, "vgg", 2048, 1024).met is False
    assert report.memory_verdict(rows, "vgg", 2048, 1024).met is False


def test_exactness_verdicts():
    exact = {"grad_weight_maxdiff": 1e-16, "grad_weight_scale": 0.1, "output_maxdiff": 0.0, "output_scale": 1.0}
    assert report.exactness_verdict(exact, 1e-9) == "exact"
    wrong = exact | {"grad_bias_maxdiff": 0.5, "grad_bias_scale": 1.0}
    assert report.exactness_verdict(wrong, 1e-9).startswith("WRONG: bias gradient off by 5.0e-01")
    shape = exact | {"output_shape_mismatch": "(1, 3, 4, 4) vs (1, 3, 5, 5)"}
    assert "output shape" in report.exactness_verdict(shape, 1e-9)
    assert report.exactness_verdict({"error": "RuntimeError: no"}, 1e-9) == "error: RuntimeError: no"
    assert report.exactness_verdict(None, 1e-9) == "not run"


def test_plan_rotates_the_order_and_checks_gradients_on_the_first_repeat():
    args = vs_lightstream.parse_args(["--networks", "vgg", "--repeats", "3", "--no-input-grad-runs"])
    groups = vs_lightstream.plan_groups(args)
    main = [g for g in groups if g.name.startswith("main-")]
    assert [g.specs[0].library for g in main] == ["conventional", "ours", "lightstream"]
    assert all(s.check_grads == (s.library != "conventional" and g.name.endswith("-r0")) for g in main for s in g.specs)
    exactness = [g for g in groups if g.name.startswith("exactness-")]
    assert len(exactness) == len(common.CASES)
    assert all(s.dtype == "float64" and s.library != "conventional" for g in exactness for s in g.specs)


# --- the peer's geometry and the CPU patch ------------------------------------------------


def lost(top, left, bottom, right):
    return SimpleNamespace(top=top, left=left, bottom=bottom, right=right)


def test_lightstream_tile_counts_follow_its_loops():
    # What lightstream's statistics give for the Table I network with tile 256 (measured):
    # output lost 3, input-gradient lost 6 per side, stride 1, tile output 256.
    sc = SimpleNamespace(tile_shape=(1, 3, 256, 256), tile_output_lost=lost(3, 3, 3, 3),
                         tile_gradient_lost=lost(6, 6, 6, 6), output_stride=torch.tensor([0, 1, 1]),
                         _tile_output_shape=(1, 3, 256, 256))  # fmt: skip
    geometry = lightstream_child.lightstream_geometry(sc, 512, 512)
    assert geometry["grid"] == [3, 3] and geometry["backward_grid"] == [3, 3]
    assert geometry["halo_factor"] == pytest.approx(9 * 256**2 / 512**2)
    small = lightstream_child.lightstream_geometry(sc, 200, 200)
    assert small["n_tiles"] == 1 and small["largest_region"] == [200, 200]


def test_cpu_patch_replaces_the_cuda_move_once_and_refuses_other_text():
    text = "def _configure(self):\n" + patch_lightstream_cpu.ORIGINAL + "        self._remove_hooks()\n"
    patched, changed = patch_lightstream_cpu.patch_text(text)
    assert changed and ".cuda()" not in patched and "torch.cuda.is_available()" in patched
    assert patch_lightstream_cpu.patch_text(patched) == (patched, False)
    with pytest.raises(RuntimeError, match="expected lightstream 1.0.7"):
        patch_lightstream_cpu.patch_text("something else")


# --- the child-process runner both drivers share ------------------------------------------


def test_a_child_result_line_is_read_back_and_failures_become_errors(tmp_path):
    spec = {"network": "vgg"}
    env = {"PATH": "/usr/bin:/bin"}

    def run(code: str, timeout: float = 60) -> dict:
        return child_process.run_measurement([sys.executable, "-c", code], "RESULT ", spec, timeout, env)

    assert run("print('noise'); print('RESULT {\"step_s\": 1.5}')") == {"step_s": 1.5}
    failed = run("import sys; print('no result'); sys.stderr.write('boom\\n'); sys.exit(3)")
    assert failed == {"network": "vgg", "error": "exit 3: boom"}
    slow = run("import time; time.sleep(5)", timeout=1)
    assert slow == {"network": "vgg", "error": "timed out after 1 s"}
    missing = child_process.run_measurement([str(tmp_path / "absent")], "RESULT ", spec, 10, env)
    assert missing["error"].startswith("could not start:")
