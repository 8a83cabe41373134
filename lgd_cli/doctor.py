"""`lgd doctor`: one row per component, where it came from, and whether it works."""
from __future__ import annotations

import importlib
import importlib.metadata as md
import platform
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Check:
    component: str
    version: str
    detail: str
    ok: bool
    required: bool = True


def _module_check(name: str, dist: str | None = None, required: bool = True) -> Check:
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # a broken install is a row, not a crash
        return Check(name, "-", f"import failed: {exc}", False, required)
    version = getattr(module, "__version__", None) or md.version(dist or name)
    return Check(name, str(version), str(Path(module.__file__).parent), True, required)


def _detectron2_checks() -> list[Check]:
    try:
        from lgd_cli.compat import detectron2 as compat

        shims = compat.apply()
        import detectron2
    except Exception as exc:
        return [Check("detectron2", "-", f"import failed: {exc}", False)]
    where = Path(detectron2.__file__).parent
    try:
        summary = md.metadata("detectron2").get("Summary") or ""
    except md.PackageNotFoundError:
        summary = ""
    compiled = compat.has_compiled_ops()
    # scripts/install_detectron2.py names the snapshot in the wheel's summary.
    source = "PyPI snapshot pb1-detectron2==0.6" if "pb1-detectron2" in summary else "own build"
    rows = [
        Check("detectron2", detectron2.__version__, f"{source}; {where}", True),
        Check("detectron2 compiled ops", "yes" if compiled else "no",
              "native _C present" if compiled else "pure Python; DCN via torchvision, rotated-box ops unavailable",
              True, required=False),
        Check("compat shims", str(len(shims)), ", ".join(shims) or "none needed", True, required=False),
    ]
    try:
        from detectron2.modeling import build_model  # noqa: F401
        from detectron2.evaluation import COCOEvaluator  # noqa: F401
    except Exception as exc:
        rows.append(Check("detectron2 modeling/evaluation", "-", f"import failed: {exc}", False))
    return rows


def run_checks() -> list[Check]:
    checks = [Check("python", platform.python_version(), platform.platform(), True)]
    checks.append(_module_check("torch"))
    try:
        import torch

        count = torch.cuda.device_count()
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(count)) or "none (CPU only)"
        checks.append(Check("CUDA devices", str(count), names, True, required=False))
    except Exception as exc:
        checks.append(Check("CUDA devices", "-", f"query failed: {exc}", False, required=False))
    checks.append(_module_check("torchvision"))
    checks.extend(_detectron2_checks())
    checks.append(_module_check("pycocotools", "pycocotools"))
    checks.append(_module_check("onnxruntime", required=False))
    return checks
