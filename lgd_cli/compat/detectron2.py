"""detectron2 0.6 on today's torch / numpy / Pillow: each shim runs only where it is needed.

`apply()` must run before the first `import detectron2...`; every lgd module that imports
detectron2 calls it first. The numbers refer to the items of docs/detectron2.md.
A user's own detectron2 build (with compiled ops, or a newer version) is left untouched
wherever it does not need a shim.
"""
from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from pathlib import Path

_applied: list[str] = []


def has_compiled_ops() -> bool:
    """True when the installed detectron2 carries its compiled `_C` extension."""
    spec = importlib.util.find_spec("detectron2")
    if spec is None or spec.submodule_search_locations is None:
        return False
    root = Path(next(iter(spec.submodule_search_locations)))
    return any(root.glob("_C*.so")) or any(root.glob("_C*.pyd"))


def _stub_compiled_ops() -> None:
    # Item 1: detectron2.layers imports detectron2._C at import time. An empty module lets
    # everything import; the ops that truly need it (rotated boxes, DCN) are replaced below
    # or fail with AttributeError naming the op.
    if "detectron2._C" not in sys.modules and not has_compiled_ops():
        sys.modules["detectron2._C"] = types.ModuleType("detectron2._C")
        _applied.append("detectron2._C stub (no compiled ops)")


def _alias_pillow_linear() -> None:
    # Item 3: Pillow 10 removed Image.LINEAR, a default argument in detectron2.data.transforms.
    from PIL import Image

    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR
        _applied.append("PIL.Image.LINEAR = BILINEAR")


def _alias_numpy_scalars() -> None:
    # Item 4: numpy 2 removed np.int / np.float (used by the class histogram and SemSegEvaluator).
    import numpy as np

    for name, value in (("int", int), ("float", float)):
        try:
            getattr(np, name)
        except AttributeError:
            setattr(np, name, value)
            _applied.append(f"numpy.{name} = {value.__name__}")


def _lightweight_export_package() -> None:
    # Item 9: detectron2/export/__init__.py imports caffe2 and fails, which makes even
    # `detectron2.export.flatten` (TracingAdapter) unimportable. Registering the package
    # without running its __init__ keeps its submodules importable.
    if "detectron2.export" in sys.modules:
        return
    spec = importlib.util.find_spec("detectron2")
    root = Path(next(iter(spec.submodule_search_locations))) / "export"
    try:
        import caffe2  # noqa: F401  (present only in old torch builds)

        return
    except ImportError:
        pass
    package = types.ModuleType("detectron2.export")
    package.__path__ = [str(root)]
    package.__package__ = "detectron2.export"
    sys.modules["detectron2.export"] = package
    _applied.append("detectron2.export without caffe2")


def _fix_head_norm_probe() -> None:
    # Item 11: RetinaNetHead (also FCOS's) calls get_norm(norm, 1) only to read the norm's
    # type name; with norm="GN" that builds GroupNorm(32 groups, 1 channel) and raises.
    # Answer that one probe with a 1-group GroupNorm; every real layer is unchanged.
    from torch import nn

    import detectron2.modeling.meta_arch.retinanet as retinanet

    original = retinanet.get_norm
    if getattr(original, "_lgd_patched", False):
        return
    try:
        original("GN", 1)
        return
    except ValueError:
        pass

    def get_norm(norm, out_channels):
        if norm == "GN" and out_channels == 1:
            return nn.GroupNorm(1, 1)
        return original(norm, out_channels)

    get_norm._lgd_patched = True
    retinanet.get_norm = get_norm
    _applied.append("RetinaNetHead GN probe")


def _clip_only_parameters_with_gradients() -> None:
    # Item 13: detectron2's gradient clipper calls clip_grad_value_/clip_grad_norm_ on every parameter;
    # torch >= 2.x raises on a parameter whose .grad is None (older torch skipped it), which
    # happens for frozen or unused parameters. Skip those, as the old behaviour did.
    import torch

    from detectron2.solver import build

    original = build._create_gradient_clipper
    if getattr(original, "_lgd_patched", False):
        return
    try:
        original(build.CfgNode({"CLIP_TYPE": "value", "CLIP_VALUE": 1.0, "NORM_TYPE": 2.0}))(
            torch.nn.Parameter(torch.zeros(1)))
        return
    except RuntimeError:
        pass

    def create(cfg):
        clip = original(cfg)

        def clip_if_gradient(p):
            if p.grad is not None:
                clip(p)

        return clip_if_gradient

    create._lgd_patched = True
    build._create_gradient_clipper = create
    _applied.append("gradient clipping skips parameters without gradients")


def fork_data_workers() -> None:
    """In a process started with "spawn", make DataLoader workers fork again (where fork exists).

    A spawned process inherits "spawn" as its default start method, so its DataLoader workers
    would re-import detectron2 from scratch, without these shims, while unpickling the dataset
    mapper. Forked workers inherit the patched modules. Call it first thing in spawned children.
    """
    import multiprocessing

    if "fork" in multiprocessing.get_all_start_methods():
        multiprocessing.set_start_method("fork", force=True)


def apply() -> list[str]:
    """Apply every needed shim once; return the descriptions of those applied (for `lgd doctor`)."""
    if _applied or getattr(apply, "_done", False):
        return list(_applied)
    # detectron2 0.6 scripts a few helpers at import time; torch 2.14 warns on each.
    warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)
    # detectron2 0.6 anchor generators call torch.meshgrid without indexing= (same result).
    warnings.filterwarnings("ignore", message=r"torch.meshgrid: in an upcoming release")
    _stub_compiled_ops()
    _alias_pillow_linear()
    _alias_numpy_scalars()
    _lightweight_export_package()
    _fix_head_norm_probe()
    _clip_only_parameters_with_gradients()
    from lgd_cli.compat import deform_conv

    if deform_conv.install():
        _applied.append("DeformConv/ModulatedDeformConv on torchvision.ops.deform_conv2d")
    # Item 14: Pillow clips 16-bit images to 255 in detectron2's read_image: lgd's scales them.
    from lgd_cli.compat import images

    images.install()
    _applied.append("read_image scales 16-bit images to 8 bits")
    apply._done = True
    return list(_applied)
