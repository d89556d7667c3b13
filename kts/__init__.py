"""kts: the reproducible companion to Parvathi & Jonnadula's CU-Net + Mask R-CNN kidney tumour paper.

Where each part of the paper lives:

==========================================  =====================
paper                                       module
==========================================  =====================
Algorithm 1 (Custom U-Net)                  ``kts.cunet``
training recipe, overfit measure D (III.A)  ``kts.train``, ``kts.metrics``
the two profiles and their recipes (IV)     ``kts.config``
IoU, Dice, accuracy (Table I)               ``kts.metrics``
MR slices (III.A.2, IV)                     ``kts.phantom``, ``kts.dicom``, ``kts.data``
kidney and tumour masks (III.A.2)           ``kts.masks``
splits (III.A.3)                            ``kts.data``
Mask R-CNN (III.B)                          ``kts.maskrcnn``
the cascade of Figure 4                     ``kts.cascade``
Figures 1, 3, 5, 6                          ``kts.plots``
one slice through Figure 4, interactively   ``kts.explorer``
Table I split study                         ``kts.study``, ``kts.runs``
unseen MR contrasts (III.A, not measured)   ``kts.contrasts``, ``kts.synth``
==========================================  =====================

Heavy modules (TensorFlow) are imported lazily so that ``import kts`` is fast. Imported in an
IPython kernel (every notebook starts with ``import kts``), kts hides the known-harmless noise
listed in ``kts.config`` (:func:`kts.config.quiet_known_noise`); ``kts.plots`` makes its figures
display inline.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any

from kts.config import print_config

__version__ = "0.1.0"

_LAZY = {
    "build_cunet": ("kts.cunet", "build_cunet"),
    "TumorMaskRCNN": ("kts.maskrcnn", "TumorMaskRCNN"),
}
_SUBMODULES = {"cascade", "cunet", "data", "fetch", "manifest", "maskrcnn", "masks", "metrics",
               "phantom", "plots", "study", "train", "config", "errors", "io", "pipeline", "bench",
               "workflow", "cli", "contrasts", "reference", "pretrain", "explorer", "runs", "dicom", "synth", "proposals"}

__all__ = ["build_cunet", "TumorMaskRCNN", "print_config", "__version__"]

if getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)() is not None:
    from kts.config import quiet_known_noise

    quiet_known_noise()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f"kts.{name}")
    raise AttributeError(f"module 'kts' has no attribute {name!r}")
