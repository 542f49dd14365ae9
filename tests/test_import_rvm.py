# SPDX-License-Identifier: GPL-3.0-or-later
"""RVM weight import, checked against RVM itself: ONNX Runtime runs RVM's graph with intermediate tensors exposed
and our PyTorch backbone / LR-ASPP must reproduce them on the same input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from oavm_service.errors import OAVMError
from oavm_service.model import OAVM, OAVMConfig
from oavm_service.model.backbone import MobileNetV3LargeEncoder
from oavm_service.train import import_rvm
from oavm_service.train.teacher import default_rvm_onnx

REPO = Path(__file__).resolve().parents[1]

ONNX = default_rvm_onnx()


@pytest.fixture(scope="module")
def rvm_graph() -> onnx.ModelProto:
    return onnx.load(str(ONNX))


@pytest.fixture(scope="module")
def rvm_features(rvm_graph):
    """RVM's backbone output and LR-ASPP output for a random 3x256x256 image, by ONNX Runtime.

    The two tensors are located independently of the importer: the last GlobalAveragePool of the graph is
    LR-ASPP's second branch (the ones before it are the backbone's squeeze-excitations), so f4 is what it reads;
    LR-ASPP's output is the Mul fed by that branch's Conv -> Sigmoid.
    """
    graph = onnx.ModelProto()
    graph.CopyFrom(rvm_graph)
    nodes = list(graph.graph.node)

    def consumer(tensor: str, op: str):
        return next(n for n in nodes if n.op_type == op and tensor in n.input)

    pool = [n for n in nodes if n.op_type == "GlobalAveragePool"][-1]
    sigmoid = consumer(consumer(pool.output[0], "Conv").output[0], "Sigmoid")
    mul = consumer(sigmoid.output[0], "Mul")
    names = [pool.input[0], mul.output[0]]
    for name in names:
        graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(1).random((1, 3, 256, 256), dtype=np.float32)
    zeros = np.zeros((1, 1, 1, 1), np.float32)
    f4, aspp = session.run(names, {"src": image, "r1i": zeros, "r2i": zeros, "r3i": zeros, "r4i": zeros,
                                   "downsample_ratio": np.array([1.0], np.float32)})
    assert f4.shape == (1, 960, 16, 16) and aspp.shape == (1, 128, 16, 16)   # stride 16, as the notes say
    return image, f4, aspp


@pytest.fixture(scope="module")
def imported():
    torch.manual_seed(0)
    model = OAVM(OAVMConfig()).eval()
    report = import_rvm.load_rvm_weights(model)
    return model, report


def _ours(model: OAVM, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        f4 = model.backbone(torch.from_numpy(image))[3]
        return f4.numpy(), model.aspp(f4).numpy()


def test_backbone_and_aspp_reproduce_rvm(imported, rvm_features):
    model, _ = imported
    image, rvm_f4, rvm_aspp = rvm_features
    f4, aspp = _ours(model, image)
    np.testing.assert_allclose(f4, rvm_f4, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(aspp, rvm_aspp, rtol=1e-4, atol=1e-4)


def test_a_random_model_does_not_pass_the_same_check(rvm_features):
    torch.manual_seed(0)
    image, rvm_f4, _ = rvm_features
    with torch.no_grad():
        f4 = MobileNetV3LargeEncoder().eval()(torch.from_numpy(image))[3].numpy()
    assert not np.allclose(f4, rvm_f4, rtol=1e-4, atol=1e-4)


def test_report_matches_what_is_in_the_model(imported, rvm_graph):
    model, report = imported
    init = {t.name: numpy_helper.to_array(t) for t in rvm_graph.graph.initializer}
    state = model.state_dict()
    # every tensor the report claims is in the model, bit for bit
    for t in report.loaded:
        if t.onnx in init:
            assert np.array_equal(state[t.ours].numpy(), init[t.onnx]), t
    # independently: backbone tensors equal to some RVM initializer of the same shape (constant tensors such as
    # BatchNorm's unit weights are left out: they would equal any constant initializer)
    by_shape: dict[tuple, list[np.ndarray]] = {}
    for a in init.values():
        by_shape.setdefault(a.shape, []).append(a)
    equal = sum(1 for name, t in state.items() if name.startswith("backbone.") and t.numel() > 1
                and t.min() != t.max()
                and any(np.array_equal(t.numpy(), a) for a in by_shape.get(tuple(t.shape), [])))
    # 62 convs in RVM's features[0..16] (notes: Conv nodes 0-61), each a weight and a (folded) bias
    assert equal == report.count("backbone") == 124
    assert report.count("aspp") == 3 and report.count("project_mat") == 2 and report.count("refiner") == 7
    # decoder: 5 block convs (weight + folded bias) and RVM's 8 ConvGRU convs (weight + bias), the latter by name
    assert report.count("decoder") == 10 + 16
    gru = [t for t in report.loaded if ".gru." in t.ours]
    assert len(gru) == 16 and all(t.ours == t.onnx for t in gru)
    assert all(np.array_equal(state[t.ours].numpy(), init[t.onnx]) for t in gru)
    assert not report.not_loaded and not report.skipped


def test_batchnorm_applies_the_folded_bias(imported, rvm_graph):
    model, _ = imported
    bn = model.backbone.features[0][1]
    assert torch.all(bn.running_mean == 0) and torch.all(bn.weight == 1)
    assert torch.allclose(bn.running_var + bn.eps, torch.ones_like(bn.running_var))
    x = torch.randn(1, 16, 4, 4)
    assert torch.allclose(bn(x), x + bn.bias.view(1, -1, 1, 1), atol=1e-6)


def test_heads_and_residual_branches_start_as_rvm(imported):
    model, _ = imported
    alpha_row = model.project_mat.weight[3:4]
    # S_k = sigmoid(gain * (alpha - 0.5)): above 0.5 exactly where the alpha logit is
    assert torch.allclose(model.project_seg.weight, import_rvm.SEG_GAIN * alpha_row)
    assert torch.allclose(model.project_seg.bias, import_rvm.SEG_GAIN * (model.project_mat.bias[3:4] - 0.5))
    assert torch.count_nonzero(model.pfe.out.weight) == 0


def test_tiny_config_loads_what_fits_and_says_what_not(tiny_model):
    report = import_rvm.load_rvm_weights(tiny_model)
    assert report.count("backbone") == 124
    skipped = {s.onnx for s in report.skipped}
    assert "aspp.aspp2.1.weight" in skipped          # 960 -> 128 in RVM, 960 -> 32 in the tiny model
    assert report.not_loaded                         # e.g. tiny aspp / decoder convs keep their init
    assert "loaded" in report.format() and "skipped" in report.format()


def test_backbone_only_leaves_the_rest_alone(tiny_model):
    before = tiny_model.pfe.out.weight.clone()
    report = import_rvm.load_rvm_weights(tiny_model, backbone_only=True)
    assert report.count("backbone") == 124 and report.count("aspp") == 0
    assert torch.equal(tiny_model.pfe.out.weight, before)


def test_errors_say_what_to_do(tmp_path):
    with pytest.raises(OAVMError, match="mobilenetv3_large"):
        import_rvm.load_rvm_weights(OAVM(OAVMConfig.tiny(backbone="resnet50")))
    with pytest.raises(OAVMError, match="does not exist"):
        import_rvm.load_rvm_weights(OAVM(OAVMConfig.tiny()), tmp_path / "missing.onnx")


def test_cli_writes_a_checkpoint_that_loads_back(tmp_path, imported, capsys):
    from oavm_service.checkpoint import load_checkpoint

    out = tmp_path / "rvm_init.safetensors"
    assert import_rvm.main(["--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "164 tensors loaded (backbone 124, aspp 3, decoder 26" in printed
    # the importer's own ONNX Runtime check ran and agrees (it aborts above 1e-3)
    check = printed.split("check against ONNX Runtime, max |ours - RVM|: ")[1].splitlines()[0]
    assert all(float(part.split()[-1]) < 1e-4 for part in check.split(", "))
    model, meta = load_checkpoint(out)
    assert meta["name"] == "rvm-import"
    reference, _ = imported
    for name, tensor in reference.state_dict().items():
        if name.startswith(("backbone.", "aspp.", "decoder.", "project_", "refiner.")):
            assert torch.equal(model.state_dict()[name], tensor), name


def test_imported_model_reproduces_rvm_frame_by_frame(imported):
    """Whole network, real frame: an imported OAVM (residual branches zeroed) is RVM without recurrence, so its
    alpha must match RVM's ONNX run frame by frame. This fails if any decoder part (e.g. the zero-state ConvGRU
    gates) is missing or mis-loaded: without the gates the difference was MAD ~65e-3."""
    import OpenImageIO as oiio

    from oavm_service.train.teacher import RVMTeacher

    frame = oiio.ImageBuf(str(REPO / "samples" / "judo" / "frames" / "00003.jpg"))
    image = frame.get_pixels(oiio.FLOAT)[::3, ::3, :3][:144, :256].copy()      # (144, 256, 3) real footage
    rvm_alpha = RVMTeacher(downsample_ratio=1.0, recurrent=False)(image[None]).alpha[0]
    model, _ = imported
    with torch.no_grad():
        out = model.forward_clip(torch.from_numpy(image).permute(2, 0, 1)[None, None], torch.ones(1, 1, 144, 256))
    ours = out["alpha"][0, 0, 0].numpy()
    assert rvm_alpha.std() > 0.1                                                # a real matte, not a flat map
    assert np.abs(ours - rvm_alpha).mean() < 5e-3
