"""Synthetic abdominal MR phantom written as real DICOM: the offline stand-in for the paper's data.

The paper (Section IV) trains on 30 TCGA-KIRC MR slices of 360x360 pixels whose kidney masks
were never published. This module draws axial abdominal MR slices through the kidneys, with
kidney-with-tumour masks (the CU-Net target, Section III.A) and tumour instance maps (the
Mask R-CNN target, Section III.B), and writes them as one DICOM MR series per case with PNG
masks beside it, so that the extraction code of ``kts.data`` serves the phantom and real
series alike.

What varies (Section III.A lists the difficulties it means to cover): kidney shape and
tumour burden (none, mild, moderate; 0-3 tumours per kidney, round to lobulated,
heterogeneous, sometimes exophytic), "scanner" gain, offset and gamma, a smooth
multiplicative bias field, Rician noise, a slight rotation and translation, and the MR
weighting (T1 post-contrast, T2, T1 pre-contrast opposed-phase).

Everything is drawn from ``numpy.random.default_rng([seed, case_index, stream])``: the same
seed gives byte-identical pixels, masks and DICOM files. Anatomy does not depend on the
weighting, so ``generate_case(i, weighting="t2")`` shows case ``i``'s anatomy in T2.

Coordinates are DICOM patient coordinates (LPS, millimetres): image columns run towards
the patient's left (patient's right on the image left), rows towards posterior (anterior at
the top), and +z is superior.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from kts import config
from kts.errors import KtsInputError
from kts.io import atomic_path, write_json, write_text
from kts.masks import renumber
from kts.metrics import burden_category, tumor_burden  # Fig. 1's burden bands live with the metrics

GENERATOR = "kts.phantom"
GENERATOR_VERSION = "1.1.0"
WEIGHTINGS = ("t1_post", "t2", "t1_pre")
DIFFICULTIES = ("easy", "paper", "hard")
IMAGE_SIZE = 360
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CASE_ID_FORMAT = "KTS-PHANTOM-{:04d}"
STUDY_DATE = "20000101"

SERIES_DESCRIPTIONS = {
    "t1_post": "AX T1 POST GAD (phantom)",
    "t2": "AX T2 SSFSE (phantom)",
    "t1_pre": "AX T1 PRE OPPOSED-PHASE (phantom)",
}

# Tissue classes of the label map kept in ``PhantomSlice.meta["tissue_labels"]``.
TISSUE_NAMES = (
    "air", "fat", "muscle", "liver", "spleen", "renal_cortex", "renal_medulla", "renal_pelvis",
    "renal_sinus_fat", "vessel", "bone_marrow", "cortical_bone", "csf", "bowel_wall",
    "bowel_fluid", "gas", "feces", "bile", "tumor", "tumor_necrosis", "tumor_capsule",
)
(AIR, FAT, MUSCLE, LIVER, SPLEEN, CORTEX, MEDULLA, PELVIS, SINUS_FAT, VESSEL, MARROW, BONE,
 CSF, BOWEL_WALL, BOWEL_FLUID, GAS, FECES, BILE, TUMOR, NECROSIS, CAPSULE) = range(len(TISSUE_NAMES))
KIDNEY_TISSUES = (CORTEX, MEDULLA, PELVIS, SINUS_FAT, TUMOR, NECROSIS, CAPSULE)
TUMOR_TISSUES = (TUMOR, NECROSIS, CAPSULE)

# Relative signal of each tissue (order of TISSUE_NAMES) per weighting. T1 post: fat-saturated
# 3D gradient echo in the corticomedullary phase; T2: single-shot fast spin echo without fat
# saturation (flow voids in vessels); T1 pre: 2D gradient echo, opposed phase (water and fat
# signals subtract, see _FAT_FRACTION).
_SIGNAL = {
    #           air  fat  musc liver spl  cort med  pelv sinF vess marr bone csf  bwal bfl  gas  fec  bile tum  nec  cap
    "t1_post": (0.0, .12, .28, .50, .56, .90, .74, .08, .12, .95, .35, .03, .08, .60, .10, 0.0, .30, .08, .58, .10, .30),
    "t2":      (0.0, .62, .12, .22, .50, .50, .60, .95, .62, .04, .40, .02, 1.0, .30, .90, 0.0, .40, .95, .88, 1.0, .25),
    "t1_pre":  (0.0, .92, .30, .56, .42, .38, .30, .08, .92, .16, .62, .03, .08, .35, .10, 0.0, .35, .10, .34, .12, .30),
}
_FAT_FRACTION = np.zeros(len(TISSUE_NAMES))
_FAT_FRACTION[[FAT, SINUS_FAT]] = 0.95
_FAT_FRACTION[MARROW] = 0.45
_FAT_FRACTION[TUMOR] = 0.20  # clear-cell RCC: intracellular lipid drops out on opposed phase
_FAT_FRACTION[FECES] = 0.1
_TEXTURE = np.full(len(TISSUE_NAMES), 0.04)
_TEXTURE[[AIR, GAS]] = 0.0
_TEXTURE[[FAT, SINUS_FAT]] = 0.03
_TEXTURE[[TUMOR, CAPSULE]] = 0.12
_TEXTURE[NECROSIS] = 0.12
_TEXTURE[[BOWEL_FLUID, BILE, CSF, PELVIS]] = 0.06
_TEXTURE[FECES] = 0.40
_TEXTURE[MARROW] = 0.10

# Acquisition parameters recorded in the DICOM header (plausible for each weighting).
_SEQUENCE = {
    "t1_post": dict(ScanningSequence="GR", SequenceVariant="SP", MRAcquisitionType="3D",
                    RepetitionTime=4.0, EchoTime=1.9, FlipAngle=12.0, EchoTrainLength=1),
    "t2": dict(ScanningSequence="SE", SequenceVariant="SK", MRAcquisitionType="2D",
               RepetitionTime=1200.0, EchoTime=90.0, FlipAngle=90.0, EchoTrainLength=128),
    "t1_pre": dict(ScanningSequence="GR", SequenceVariant="SP", MRAcquisitionType="2D",
                   RepetitionTime=150.0, EchoTime=2.2, FlipAngle=70.0, EchoTrainLength=1),
}
_RESCALE_SLOPES = (0.25, 0.5, 1.0, 2.0, 4.0)
_RESCALE_OFFSETS = (0, 0, 16, 64)  # stored = round(value / slope) + k, intercept = -k * slope


@dataclass(frozen=True)
class _Difficulty:
    snr: tuple[float, float]            # mean body signal / noise sigma
    bias: float                         # std of the log bias field
    contrast: float                     # scales kidney-vs-liver/spleen and tumour-vs-kidney contrast
    tumor_radius_mm: tuple[float, float]
    p_tumor_free: float
    counts_first: tuple[float, ...]     # P(1, 2, 3 tumours) in the first tumour kidney
    counts_other: tuple[float, ...]     # P(0, 1, 2, 3 tumours) in the other kidney
    rotation_deg: float
    translation_mm: float
    shape_jitter: float
    gamma: tuple[float, float]
    gain_decades: float                 # gain spread, log10 units


_DIFFICULTY = {
    "easy": _Difficulty(snr=(35.0, 60.0), bias=0.05, contrast=1.3, tumor_radius_mm=(9.0, 24.0),
                        p_tumor_free=0.25, counts_first=(1.0, 0.0, 0.0), counts_other=(0.8, 0.2, 0.0, 0.0),
                        rotation_deg=2.0, translation_mm=5.0, shape_jitter=0.5, gamma=(0.95, 1.05),
                        gain_decades=0.3),
    "paper": _Difficulty(snr=(14.0, 35.0), bias=0.15, contrast=1.0, tumor_radius_mm=(5.0, 25.0),
                         p_tumor_free=0.2, counts_first=(0.6, 0.3, 0.1), counts_other=(0.6, 0.3, 0.1, 0.0),
                         rotation_deg=4.0, translation_mm=10.0, shape_jitter=1.0, gamma=(0.85, 1.18),
                         gain_decades=0.8),
    "hard": _Difficulty(snr=(5.0, 13.0), bias=0.35, contrast=0.6, tumor_radius_mm=(3.0, 22.0),
                        p_tumor_free=0.1, counts_first=(0.3, 0.4, 0.3), counts_other=(0.3, 0.4, 0.2, 0.1),
                        rotation_deg=8.0, translation_mm=15.0, shape_jitter=1.5, gamma=(0.75, 1.33),
                        gain_decades=1.2),
}


@dataclass
class PhantomSlice:
    """One axial MR slice with its ground truth (Section III.A.2: image I_k, mask M_k).

    ``image`` is float32 signal (arbitrary MR units, >= 0) exactly as a DICOM reader returns it
    after applying RescaleSlope/RescaleIntercept; ``kidney_mask`` is uint8 0/1 for the kidneys
    including their tumours (the CU-Net target); ``tumor_labels`` is uint16 with tumour
    instances 1..n (the Mask R-CNN target). ``meta`` holds acquisition values, UIDs, tumour
    list and the tissue label map (``meta["tissue_labels"]``, classes in ``TISSUE_NAMES``).
    """

    image: np.ndarray
    kidney_mask: np.ndarray
    tumor_labels: np.ndarray
    case_id: str
    slice_index: int
    weighting: str
    difficulty: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tumors(self) -> int:
        return int(self.tumor_labels.max(initial=0))

    @property
    def tumor_burden(self) -> float:
        """Tumour pixels over kidney-with-tumour pixels (0 when there is no kidney; ``kts.metrics.tumor_burden``)."""
        return tumor_burden(self.kidney_mask, self.tumor_labels)


# --------------------------------------------------------------------------- argument checks

def _check_difficulty(difficulty: object) -> _Difficulty:
    if not isinstance(difficulty, str) or difficulty not in _DIFFICULTY:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}; got {difficulty!r}")
    return _DIFFICULTY[difficulty]


def _check_weighting(weighting: object) -> str:
    if not isinstance(weighting, str) or weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")
    return weighting


def _check_weightings(weightings: object) -> tuple[str, ...]:
    if weightings is None:
        return WEIGHTINGS
    if isinstance(weightings, str):
        weightings = (weightings,)
    try:
        values = tuple(weightings)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"weightings must be None, one of {WEIGHTINGS} or a list of them; got {weightings!r}") from None
    if not values:
        raise ValueError(f"weightings must not be empty: give some of {WEIGHTINGS} or None for all")
    return tuple(_check_weighting(w) for w in values)


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer; got {type(value).__name__} {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be >= {minimum}{upper}; got {value}")
    return int(value)


def case_id_for(case_index: int) -> str:
    """The pseudonymous PatientID of case ``case_index`` (0-based): ``KTS-PHANTOM-0001`` for 0."""
    return CASE_ID_FORMAT.format(case_index + 1)


def weighting_for(case_index: int, weightings: Sequence[str] | None = None) -> str:
    """Weighting of case ``case_index`` in a dataset: the list is cycled (case 0 gets the first)."""
    ws = _check_weightings(weightings)
    return ws[case_index % len(ws)]


# --------------------------------------------------------------------------- geometry

def _fourier(rng: np.random.Generator, orders: Iterable[int], scale: float) -> tuple[tuple[int, float, float], ...]:
    return tuple((k, float(rng.normal(0.0, scale / k)), float(rng.uniform(0, 2 * np.pi))) for k in orders)


def _wrap(angle: np.ndarray) -> np.ndarray:
    """Angle wrapped to [-pi, pi)."""
    return (angle + np.pi) % (2 * np.pi) - np.pi


def _radius(theta: np.ndarray, coeffs: Sequence[tuple[int, float, float]]) -> np.ndarray:
    r = np.ones_like(theta)
    for k, amp, phase in coeffs:
        r += amp * np.cos(k * theta + phase)
    return r


class _Canvas:
    """Anatomy-to-pixel mapping (pose = rotation + translation) and the tissue label map."""

    def __init__(self, size: int, spacing: float, rotation_deg: float, shift: tuple[float, float]):
        self.size, self.spacing = size, spacing
        self.cos, self.sin = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
        self.shift = shift
        axis = (np.arange(size) - (size - 1) / 2.0) * spacing
        dx = axis[None, :] - shift[0]
        dy = axis[:, None] - shift[1]
        self.x = (self.cos * dx + self.sin * dy).astype(np.float32)
        self.y = (-self.sin * dx + self.cos * dy).astype(np.float32)
        self.tissue = np.zeros((size, size), np.uint8)

    def window(self, cx: float, cy: float, extent: float) -> tuple[slice, slice]:
        px = self.cos * cx - self.sin * cy + self.shift[0]
        py = self.sin * cx + self.cos * cy + self.shift[1]
        col = px / self.spacing + (self.size - 1) / 2.0
        row = py / self.spacing + (self.size - 1) / 2.0
        r = extent / self.spacing + 2.0
        r0, r1 = max(0, int(math.floor(row - r))), min(self.size, int(math.ceil(row + r)) + 1)
        c0, c1 = max(0, int(math.floor(col - r))), min(self.size, int(math.ceil(col + r)) + 1)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))

    def star(self, win, cx, cy, a, b, angle=0.0, coeffs=()):
        """Normalised radius f (inside where f < 1) and polar angle of a perturbed ellipse."""
        x, y = self.x[win] - cx, self.y[win] - cy
        c, s = math.cos(angle), math.sin(angle)
        u, v = (c * x + s * y) / a, (-s * x + c * y) / b
        theta = np.arctan2(v, u)
        f = np.hypot(u, v)
        if coeffs:
            f = f / _radius(theta, coeffs)
        return f, theta

    def ellipse(self, cx, cy, a, b, angle=0.0, coeffs=(), pad=1.3):
        win = self.window(cx, cy, max(a, b) * pad)
        f, _ = self.star(win, cx, cy, a, b, angle, coeffs)
        return win, f < 1.0

    def paint(self, label: int, win, mask: np.ndarray, within: np.ndarray | None = None) -> None:
        if within is not None:
            mask = mask & within[win]
        self.tissue[win][mask] = label

    def capsule(self, points: Sequence[tuple[float, float]], radius: float):
        """Mask of a thick polyline (a vessel) as (window, mask) pairs per segment."""
        out = []
        for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            win = self.window(cx, cy, math.hypot(x1 - x0, y1 - y0) / 2 + radius)
            x, y = self.x[win] - x0, self.y[win] - y0
            dx, dy = x1 - x0, y1 - y0
            t = np.clip((x * dx + y * dy) / max(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
            out.append((win, np.hypot(x - t * dx, y - t * dy) < radius))
        return out


# --------------------------------------------------------------------------- anatomy

@dataclass
class _Tumor:
    tumor_id: int
    side: int            # -1 right kidney (image left), +1 left kidney
    theta: float         # position in the kidney's normalised polar frame
    depth: float         # 0 centre .. 1 kidney outline; > 1 outside (exophytic)
    radius: float        # mm, at its equator
    aspect: float
    angle: float
    coeffs: tuple
    z: float             # mm, equator position
    necrosis: float      # normalised core radius (0 = solid)
    capsule: bool
    brightness: float


@dataclass
class _Kidney:
    side: int
    cx: float
    cy: float
    a: float
    b: float
    phi: float
    coeffs: tuple
    notch: float
    notch_width: float
    cortex: float
    pyramids: int
    pyramid_phase: float
    pelvis: bool
    z0: float
    half_length: float
    fat_margin: float


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _draw_anatomy(rng: np.random.Generator, diff: _Difficulty, spacing: float) -> dict[str, Any]:
    """Draw one patient's anatomy (Section III.A: shape variability) in millimetres."""
    j = diff.shape_jitter
    half_fov = spacing * IMAGE_SIZE / 2.0
    an: dict[str, Any] = {}
    a = _uniform(rng, 150, 172)
    an["body"] = dict(a=min(a, 0.9 * half_fov), b_ant=_uniform(rng, 105, 128), b_post=_uniform(rng, 100, 114),
                      p=_uniform(rng, 2.1, 2.6), coeffs=_fourier(rng, (2, 3, 4, 5), 0.03 * j),
                      cy=_uniform(rng, -6, 4))
    an["fat"] = dict(t0=_uniform(rng, 7, 28), anterior=_uniform(rng, 0.0, 0.5), muscle=_uniform(rng, 7, 12))
    ys = an["body"]["b_post"] + an["body"]["cy"] - _uniform(rng, 84, 96)  # vertebral body centre
    rv = _uniform(rng, 17, 21)
    an["spine"] = dict(y=ys, r=rv, canal=_uniform(rng, 7, 9))
    an["aorta"] = dict(x=_uniform(rng, 6, 14), y=ys - rv - _uniform(rng, 11, 14), r=_uniform(rng, 9, 12))
    an["ivc"] = dict(x=-_uniform(rng, 22, 28), y=ys - rv - _uniform(rng, 8, 14), a=_uniform(rng, 10, 15),
                     b=_uniform(rng, 7, 10))
    an["muscles"] = []
    for side in (-1, 1):
        an["muscles"].append(dict(kind="psoas", cx=side * (rv + _uniform(rng, 10, 15)), cy=ys - _uniform(rng, 0, 6),
                                  a=_uniform(rng, 10, 14), b=_uniform(rng, 13, 18), angle=side * 0.3))
        an["muscles"].append(dict(kind="ql", cx=side * _uniform(rng, 52, 62), cy=ys + _uniform(rng, 18, 26),
                                  a=_uniform(rng, 9, 13), b=_uniform(rng, 15, 20), angle=-side * 0.5))
        an["muscles"].append(dict(kind="erector", cx=side * _uniform(rng, 30, 36), cy=ys + rv + _uniform(rng, 30, 36),
                                  a=_uniform(rng, 20, 26), b=_uniform(rng, 20, 26), angle=side * 0.15))
    an["kidneys"] = []
    for side in (-1, 1):
        an["kidneys"].append(_Kidney(
            side=side, cx=side * _uniform(rng, 68, 84), cy=ys + _uniform(rng, -4, 8),
            a=_uniform(rng, 27, 33), b=_uniform(rng, 18, 23), phi=math.radians(_uniform(rng, 25, 50)),
            coeffs=_fourier(rng, (2, 3, 4), 0.04 * j), notch=_uniform(rng, 0.28, 0.42),
            notch_width=_uniform(rng, 0.3, 0.45), cortex=_uniform(rng, 0.66, 0.76),
            pyramids=int(rng.integers(4, 7)), pyramid_phase=_uniform(rng, 0, 2 * np.pi),
            pelvis=bool(rng.random() < 0.7),
            z0=_uniform(rng, -12, -3) if side < 0 else _uniform(rng, -4, 4),
            half_length=_uniform(rng, 50, 60), fat_margin=_uniform(rng, 0.12, 0.35)))
    an["liver"] = dict(cx=-_uniform(rng, 72, 92), cy=_uniform(rng, -30, -5), a=_uniform(rng, 52, 70),
                       b=_uniform(rng, 62, 82), angle=math.radians(_uniform(rng, -20, 15)),
                       coeffs=_fourier(rng, (2, 3, 4, 5), 0.10 * j))
    an["gallbladder"] = (dict(cx=-_uniform(rng, 35, 50), cy=-_uniform(rng, 30, 55), a=_uniform(rng, 9, 15),
                              b=_uniform(rng, 14, 22), angle=_uniform(rng, -0.5, 0.5))
                         if rng.random() < 0.4 else None)
    an["spleen"] = (dict(cx=_uniform(rng, 92, 108), cy=ys + _uniform(rng, -25, 0), a=_uniform(rng, 16, 26),
                         b=_uniform(rng, 30, 45), angle=-math.radians(_uniform(rng, 20, 50)),
                         coeffs=_fourier(rng, (2, 3), 0.05 * j), z_top=_uniform(rng, -10, 40))
                    if rng.random() < 0.85 else None)
    bowel = [dict(cx=-_uniform(rng, 78, 95), cy=_uniform(rng, -15, 10), r=_uniform(rng, 13, 19),
                  aspect=_uniform(rng, 0.8, 1.0), content=int(rng.choice([GAS, FECES]))),
             dict(cx=_uniform(rng, 88, 108), cy=_uniform(rng, -30, 0), r=_uniform(rng, 10, 15),
                  aspect=_uniform(rng, 0.8, 1.0), content=int(rng.choice([GAS, FECES])))]
    for _ in range(int(rng.integers(6, 12))):
        bowel.append(dict(cx=_uniform(rng, -55, 95), cy=_uniform(rng, -100, ys - rv - 28), r=_uniform(rng, 8, 17),
                          aspect=_uniform(rng, 0.6, 1.0),
                          content=int(rng.choice([BOWEL_FLUID, GAS, FECES], p=[0.45, 0.25, 0.30]))))
    for loop in bowel:
        loop["angle"] = _uniform(rng, 0, np.pi)
    an["bowel"] = bowel
    an["ribs"] = [dict(side=side, angle=_uniform(rng, 0.35, 0.8) + k * _uniform(rng, 0.3, 0.4),
                       r=_uniform(rng, 4, 6)) for side in (-1, 1) for k in range(int(rng.integers(1, 3)))]
    an["tumors"] = _draw_tumors(rng, diff)
    return an


def _draw_tumors(rng: np.random.Generator, diff: _Difficulty) -> list[_Tumor]:
    """0-3 tumours per kidney; some cases tumour-free (Fig. 1: no, mild, moderate tumour)."""
    if rng.random() < diff.p_tumor_free:
        return []
    first = int(rng.choice([-1, 1]))
    counts = {first: 1 + int(rng.choice(len(diff.counts_first), p=diff.counts_first)),
              -first: int(rng.choice(len(diff.counts_other), p=diff.counts_other))}
    lo, hi = np.log(diff.tumor_radius_mm[0]), np.log(diff.tumor_radius_mm[1])
    tumors = []
    for side in (-1, 1):
        for _ in range(counts[side]):
            radius = float(np.exp(rng.uniform(lo, hi)))
            exophytic = rng.random() < 0.4
            depth = _uniform(rng, 0.85, 1.15) if exophytic else _uniform(rng, 0.0, 0.7)
            theta = np.pi / 2 + _uniform(rng, 0.7, 2 * np.pi - 0.7)  # away from the hilum
            tumors.append(_Tumor(
                tumor_id=len(tumors) + 1, side=side, theta=theta, depth=depth, radius=radius,
                aspect=_uniform(rng, 0.75, 1.0), angle=_uniform(rng, 0, np.pi),
                coeffs=_fourier(rng, (2, 3, 4), _uniform(rng, 0.0, 0.25)),
                z=_uniform(rng, -0.4, 0.4) * radius,
                necrosis=_uniform(rng, 0.3, 0.65) if rng.random() < np.clip((radius - 8) / 20, 0, 0.7) else 0.0,
                capsule=bool(rng.random() < 0.5), brightness=_uniform(rng, 0.85, 1.15)))
    return tumors


def _draw_scanner(rng: np.random.Generator, diff: _Difficulty) -> dict[str, Any]:
    """Per-case "scanner" nuisances (Section III.A: images from different MR scanners)."""
    return dict(
        gain=float(10 ** rng.uniform(3.0 - diff.gain_decades / 2, 3.0 + diff.gain_decades / 2)) * 0.9,
        offset=_uniform(rng, 0.0, 30.0),
        gamma=_uniform(rng, *diff.gamma),
        snr=_uniform(rng, *diff.snr),
        bias=[float(c) for c in rng.normal(0.0, 1.0, 6)],
        field_strength=float(rng.choice([1.5, 3.0])),
        slope_pick=float(rng.random()),
        offset_k=int(rng.choice(_RESCALE_OFFSETS)),
    )


# --------------------------------------------------------------------------- rendering

def _kidney_geometry(cv: _Canvas, k: _Kidney, z: float):
    dz = z - k.z0
    scale2 = 1.0 - (dz / k.half_length) ** 2
    if scale2 < 0.09:
        return None
    scale = math.sqrt(scale2)
    a, b = k.a * scale, k.b * scale
    cx, cy = k.cx + 0.12 * k.side * -dz, k.cy - 0.05 * dz   # lower poles sit more lateral and anterior
    eu = (k.side * math.sin(k.phi), -math.cos(k.phi))      # long axis: posteromedial -> anterolateral
    ev = (-k.side * math.cos(k.phi), -math.sin(k.phi))     # towards the hilum: anteromedial
    notch = k.notch * math.exp(-(dz / 16.0) ** 2)
    win = cv.window(cx, cy, max(a, b) * (1.2 + k.fat_margin) + 45.0)  # room for exophytic tumours
    x, y = cv.x[win] - cx, cv.y[win] - cy
    u, v = (x * eu[0] + y * eu[1]) / a, (x * ev[0] + y * ev[1]) / b
    theta = np.arctan2(v, u)
    d_hil = _wrap(theta - np.pi / 2)
    r = _radius(theta, k.coeffs) - notch * np.exp(-d_hil ** 2 / (2 * k.notch_width ** 2))
    d = np.hypot(u, v) / r
    return dict(win=win, d=d, theta=theta, u=u, v=v, a=a, b=b, cx=cx, cy=cy, eu=eu, ev=ev, notch=notch,
                sinus=math.exp(-(dz / 28.0) ** 2), kidney=k)


def _paint_kidney(cv: _Canvas, g: dict) -> None:
    k: _Kidney = g["kidney"]
    win, d, theta, u, v = g["win"], g["d"], g["theta"], g["u"], g["v"]
    bean = d < 1.0
    cv.paint(CORTEX, win, bean)
    # pyramids: wedges with their base under the cortex, tips towards the sinus (columns of Bertin between)
    wedge = np.cos(k.pyramids * theta + k.pyramid_phase)
    medulla = bean & (d < k.cortex) & (d > 0.25) & (wedge > -0.35 + 2.2 * (k.cortex - d))
    cv.paint(MEDULLA, win, medulla)
    s = g["sinus"]
    if s > 0.15:
        sinus = bean & (np.hypot(u / (0.55 * s), (v - 0.3) / (0.45 * s)) < 1.0)
        cv.paint(SINUS_FAT, win, sinus)
        if k.pelvis:
            cv.paint(PELVIS, win, bean & (np.hypot(u / (0.3 * s), (v - 0.4) / (0.22 * s)) < 1.0))


def _tumor_fields(cv: _Canvas, geoms: dict[int, dict], tumors: list[_Tumor], z: float):
    """Per-tumour (window, f) at slice z; f < 1 inside (a sphere-like tumour cut at z)."""
    out = []
    for t in tumors:
        g = geoms.get(t.side)
        rz2 = t.radius ** 2 - (z - t.z) ** 2
        if g is None or rz2 < 4.0:
            continue
        rz = math.sqrt(rz2)
        lu, lv = g["a"] * t.depth * math.cos(t.theta), g["b"] * t.depth * math.sin(t.theta)
        tx = g["cx"] + lu * g["eu"][0] + lv * g["ev"][0]
        ty = g["cy"] + lu * g["eu"][1] + lv * g["ev"][1]
        win = cv.window(tx, ty, rz * 1.5)
        f, _ = cv.star(win, tx, ty, rz, rz * t.aspect, t.angle, t.coeffs)
        out.append((t, win, f))
    return out


def _render_tissue(an: dict, cv: _Canvas, z: float, tex: np.ndarray):
    """Paint the tissue label map of one slice; returns tissue, tumour instance map, tumour list."""
    size, ps = cv.size, cv.spacing
    body_p = an["body"]
    full = (slice(0, size), slice(0, size))
    x, y = cv.x, cv.y - body_p["cy"]
    bpost = body_p["b_post"]
    bb = np.where(y > 0, bpost, body_p["b_ant"])
    theta = np.arctan2(y / bb, x / body_p["a"])
    rho = (np.abs(x / body_p["a"]) ** body_p["p"] + np.abs(y / bb) ** body_p["p"]) ** (1 / body_p["p"])
    body = rho / _radius(theta, body_p["coeffs"]) < 1.0
    depth = ndimage.distance_transform_edt(body) * ps
    fat = an["fat"]
    sin_t = np.sin(theta)
    t_fat = fat["t0"] * (1 + fat["anterior"] * np.clip(-sin_t, 0, None) + 0.3 * np.cos(2 * theta) ** 2
                         - 0.4 * np.clip(sin_t, 0, None))
    off = _wrap(theta + np.pi / 2)  # angle from the anterior midline
    t_mus = fat["muscle"] * (0.75 + 0.9 * np.exp(-((np.abs(off) - 0.22) / 0.15) ** 2))   # recti
    t_mus = t_mus * (1 - 0.85 * np.exp(-(off / 0.03) ** 2))                              # linea alba
    inner = depth > t_fat
    cavity = depth > t_fat + t_mus
    cv.paint(FAT, full, body)
    cv.paint(MUSCLE, full, inner & ~cavity)
    cv.paint(FAT, full, cavity)
    # bowel loops: wall and content (gas, fluid, feces), in the peritoneal cavity
    for loop in an["bowel"]:
        r = loop["r"]
        win = cv.window(loop["cx"], loop["cy"], r * 1.2)
        f, _ = cv.star(win, loop["cx"], loop["cy"], r, r * loop["aspect"], loop["angle"])
        cv.paint(BOWEL_WALL, win, f < 1.0, cavity)
        cv.paint(loop["content"], win, f < 1.0 - 2.5 / r, cavity)
    for m in an["muscles"]:
        win, mask = cv.ellipse(m["cx"], m["cy"], m["a"], m["b"], m["angle"])
        cv.paint(MUSCLE, win, mask, inner)
    geoms = {}
    for k in an["kidneys"]:
        g = _kidney_geometry(cv, k, z)
        if g is not None:
            geoms[k.side] = g
            cv.paint(FAT, g["win"], g["d"] < 1.0 + k.fat_margin, inner)   # perirenal fat
    liver = an["liver"]
    grow = 1.0 + 0.006 * z
    win, mask = cv.ellipse(liver["cx"], liver["cy"], liver["a"] * grow, liver["b"] * grow, liver["angle"],
                           liver["coeffs"])
    cv.paint(LIVER, win, mask, cavity)
    if an["gallbladder"] is not None:
        gb = an["gallbladder"]
        win, mask = cv.ellipse(gb["cx"], gb["cy"], gb["a"], gb["b"], gb["angle"])
        cv.paint(BILE, win, mask, cavity)
    sp = an["spleen"]
    if sp is not None and z < sp["z_top"] + 40:
        s = math.sqrt(max(0.0, 1 - ((z - sp["z_top"]) / 60.0) ** 2)) if z < sp["z_top"] else 1.0
        if s > 0.3:
            win, mask = cv.ellipse(sp["cx"], sp["cy"], sp["a"] * s, sp["b"] * s, sp["angle"], sp["coeffs"])
            cv.paint(SPLEEN, win, mask, cavity)
    ivc, ao, spine = an["ivc"], an["aorta"], an["spine"]
    win, mask = cv.ellipse(ivc["x"], ivc["y"], ivc["a"], ivc["b"])
    cv.paint(VESSEL, win, mask)
    # mesenteric vessels anterior to the aorta
    for dx, r in ((0.0, 4.0), (-9.0, 5.0)):
        win, mask = cv.ellipse(ao["x"] + dx, ao["y"] - ao["r"] - 14, r, r)
        cv.paint(VESSEL, win, mask, cavity)
    # renal veins near the hilum; the left one passes anterior to the aorta
    for side, g in geoms.items():
        k = g["kidney"]
        if abs(z - k.z0) > 7.0:
            continue
        hx = g["cx"] + g["ev"][0] * g["b"] * 0.7
        hy = g["cy"] + g["ev"][1] * g["b"] * 0.7
        path = [(hx, hy)]
        if side > 0:
            path.append((ao["x"] + 6, ao["y"] - ao["r"] - 5))
        path.append((ivc["x"], ivc["y"]))
        for win, mask in cv.capsule(path, 3.5):
            cv.paint(VESSEL, win, mask, inner)
    for g in geoms.values():
        _paint_kidney(cv, g)
    # tumours: each pixel goes to the tumour whose own (normalised) outline it is deepest in,
    # so touching tumours keep distinct instance labels
    hard = _hard_structures(an, cv)
    fields = _tumor_fields(cv, geoms, an["tumors"], z)
    keep = [True] * len(fields)
    while True:
        inst = np.zeros((size, size), np.uint16)
        fmin = np.full((size, size), np.inf, np.float32)
        for i, (t, win, f) in enumerate(fields):
            if not keep[i]:
                continue
            take = (f < 1.0) & (f < fmin[win]) & ~hard[win]
            fmin[win][take] = f[take]
            inst[win][take] = i + 1
        dropped = False
        for i, (t, win, f) in enumerate(fields):
            if not keep[i]:
                continue
            g = geoms[t.side]
            region = inst[g["win"]] == i + 1
            total = int(np.count_nonzero(inst == i + 1))
            inside = int(np.count_nonzero(region & (g["d"] < 1.0)))
            n_parts = ndimage.label(inst == i + 1)[1] if total else 0
            # it must touch tumour-free kidney, not only other tumours (no tumour engulfed by another)
            parenchyma = (g["d"] < 1.0) & (inst[g["win"]] == 0) & ~hard[g["win"]]
            touches = bool(np.any(ndimage.binary_dilation(region) & parenchyma)) if total else False
            if (total < 15 or inside < 0.25 * total or n_parts != 1 or not touches
                    or total != int(np.count_nonzero(region))):
                keep[i] = False
                dropped = True
        if not dropped:
            break
    tumors_here = []
    nec = np.zeros(len(fields) + 1)
    cap = np.zeros(len(fields) + 1, bool)
    for i, (t, win, f) in enumerate(fields):
        if keep[i]:
            nec[i + 1] = t.necrosis
            cap[i + 1] = t.capsule
    cv.tissue[inst > 0] = TUMOR
    cv.tissue[(inst > 0) & (fmin < nec[inst] * (1 + 0.35 * tex))] = NECROSIS
    cv.tissue[(inst > 0) & cap[inst] & (fmin > 0.88)] = CAPSULE
    # hard structures last: vertebra, spinal canal, posterior elements, ribs, aorta
    win, mask = cv.ellipse(0.0, spine["y"], spine["r"], spine["r"] * 0.92)
    cv.paint(BONE, win, mask)
    win, mask = cv.ellipse(0.0, spine["y"], spine["r"] - 1.8, spine["r"] * 0.92 - 1.8)
    cv.paint(MARROW, win, mask)
    for win, mask in _posterior_elements(an, cv):
        cv.paint(MARROW, win, mask, inner)
    cy_canal = spine["y"] + spine["r"] + spine["canal"] + 1
    win, mask = cv.ellipse(0.0, cy_canal, spine["canal"] * 1.1, spine["canal"])
    cv.paint(CSF, win, mask)
    for win, mask, label in _ribs(an, cv):
        cv.paint(label, win, mask, body)
    win, mask = cv.ellipse(ao["x"], ao["y"], ao["r"], ao["r"])
    cv.paint(VESSEL, win, mask)
    inst[~np.isin(cv.tissue, TUMOR_TISSUES)] = 0
    # final instance numbering 1..n in tumour order
    ids = [i + 1 for i in range(len(fields)) if keep[i] and np.any(inst == i + 1)]
    inst = np.where(np.isin(inst, ids), inst, 0)
    for new, old in enumerate(ids, start=1):
        t = fields[old - 1][0]
        g = geoms[t.side]
        area = int(np.count_nonzero(inst == old))
        outside = area - int(np.count_nonzero((inst[g["win"]] == old) & (g["d"] < 1.0)))
        tumors_here.append(dict(label=new, tumor_id=t.tumor_id, side="left" if t.side > 0 else "right",
                                area_px=area, radius_mm=round(t.radius, 2), exophytic=outside > 0.1 * area,
                                necrotic=bool(np.any((inst == old) & (cv.tissue == NECROSIS)))))
    return cv.tissue, renumber(inst), tumors_here, body


def _hard_structures(an: dict, cv: _Canvas) -> np.ndarray:
    """Vertebra, canal and aorta: tumours stop at them (they are painted on top)."""
    hard = np.zeros((cv.size, cv.size), bool)
    spine, ao = an["spine"], an["aorta"]
    for cx, cy, a, b in ((0.0, spine["y"], spine["r"], spine["r"]),
                         (0.0, spine["y"] + spine["r"] + spine["canal"] + 1, spine["canal"] * 1.1, spine["canal"]),
                         (ao["x"], ao["y"], ao["r"], ao["r"])):
        win, mask = cv.ellipse(cx, cy, a, b)
        hard[win] |= mask
    for win, mask in _posterior_elements(an, cv):
        hard[win] |= mask
    for win, mask, _ in _ribs(an, cv):
        hard[win] |= mask
    return hard


def _posterior_elements(an: dict, cv: _Canvas):
    spine = an["spine"]
    yc = spine["y"] + spine["r"] + spine["canal"] + 1
    out = [cv.ellipse(0.0, yc + 2, spine["canal"] + 5, spine["canal"] + 5)]       # lamina ring (canal painted later)
    out += cv.capsule([(0.0, yc + spine["canal"]), (0.0, yc + spine["canal"] + 26)], 3.5)  # spinous process
    for side in (-1, 1):
        out += cv.capsule([(side * 8.0, yc - 4), (side * 34.0, yc - 8)], 3.0)     # transverse processes
    return out


def _ribs(an: dict, cv: _Canvas):
    body, fat = an["body"], an["fat"]
    out = []
    for rib in an["ribs"]:
        ang = rib["angle"]  # measured from +x towards +y (posterior)
        ca, sa = math.cos(ang), math.sin(ang)
        depth = fat["t0"] * 1.1 + fat["muscle"] * 0.5
        rx = rib["side"] * abs(ca) * (body["a"] - depth)
        ry = body["cy"] + sa * (body["b_post"] - depth)
        win, mask = cv.ellipse(rx, ry, rib["r"], rib["r"] * 0.8, ang)
        out.append((win, mask, BONE))
        win, mask = cv.ellipse(rx, ry, rib["r"] - 1.5, rib["r"] * 0.8 - 1.5, ang)
        out.append((win, mask, MARROW))
    return out


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), sigma, mode="wrap")
    return n / max(float(n.std()), 1e-12)


def _signal_table(weighting: str, diff: _Difficulty) -> np.ndarray:
    """Tissue signals for one weighting with the difficulty's contrast factor applied."""
    lut = np.array(_SIGNAL[weighting], dtype=np.float64)
    c = diff.contrast
    neighbours = 0.5 * (lut[LIVER] + lut[SPLEEN])
    for t in (CORTEX, MEDULLA):
        lut[t] = neighbours + c * (lut[t] - neighbours)
    kidney = 0.5 * (lut[CORTEX] + lut[MEDULLA])
    for t in TUMOR_TISSUES:
        lut[t] = kidney + c * (lut[t] - kidney)
    return np.clip(lut, 0.0, None)


def _bias_field(coeffs: Sequence[float], size: int, amplitude: float) -> np.ndarray:
    """Smooth multiplicative bias field exp(amplitude * low-order polynomial) (Section III.A)."""
    t = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    x, y = t[None, :], t[:, None]
    terms = [x, y, x * y, 1.5 * x * x - 0.5, 1.5 * y * y - 0.5, x * y * y]
    poly = sum(c * term for c, term in zip(coeffs, terms))
    poly = poly / max(float(np.std(poly)), 1e-12)
    return np.exp(np.float32(amplitude) * poly).astype(np.float32)


def _render_signal(tissue: np.ndarray, inst: np.ndarray, tumors: list, an: dict, weighting: str,
                   diff: _Difficulty, scanner: dict, rng: np.random.Generator, tex: np.ndarray,
                   tex_fine: np.ndarray) -> tuple[np.ndarray, float]:
    """MR magnitude signal of a tissue map: texture, partial volume, bias, Rician noise, scanner."""
    size = tissue.shape[0]
    lut = _signal_table(weighting, diff).astype(np.float32)
    base = lut[tissue]
    amp = _TEXTURE.astype(np.float32)[tissue]
    is_tumor = inst > 0
    texture = np.where(is_tumor, 0.5 * tex + 0.8 * tex_fine, 0.7 * tex + 0.5 * tex_fine)
    base = base * np.clip(1.0 + amp * texture, 0.2, None)
    if tumors:
        factor = np.ones(int(inst.max()) + 1, np.float32)
        for t in tumors:
            factor[t["label"]] = next(x.brightness for x in an["tumors"] if x.tumor_id == t["tumor_id"])
        base = base * factor[inst]
    if weighting == "t1_pre":  # opposed phase: water and fat signals subtract after partial volume
        ff = _FAT_FRACTION.astype(np.float32)[tissue]
        water = ndimage.gaussian_filter(base * (1 - ff), 0.8)
        fat = ndimage.gaussian_filter(base * ff, 0.8)
        signal = np.abs(water - fat)
    else:
        signal = ndimage.gaussian_filter(base, 0.7)
    signal = signal * _bias_field(scanner["bias"], size, diff.bias)
    body = tissue > 0
    sigma = float(signal[body].mean()) / scanner["snr"]
    real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    magnitude = np.hypot(real, imag)
    scale = float(np.percentile(signal[body], 99.5))
    out = scanner["gain"] * scale * (magnitude / scale) ** scanner["gamma"] + scanner["offset"]
    return out, sigma


# --------------------------------------------------------------------------- public generation

_UID_NAMESPACE = uuid.UUID("6f1c2a8e-5d0b-5b8e-9c1e-4b7a3f0d2e11")


def _uid(*parts: object) -> str:
    """A deterministic UUID-derived UID (``2.25.<128-bit int>``, DICOM PS3.5 B.2) from ``parts``.

    (``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` ignores the entropy and is random.)
    """
    name = "|".join([GENERATOR, GENERATOR_VERSION, *map(str, parts)])
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def generate_case(case_index: int, seed: int = 0, difficulty: str = "paper", slices_per_case: int = 1,
                  weighting: str | None = None, size: int = IMAGE_SIZE) -> list[PhantomSlice]:
    """Draw one case: ``slices_per_case`` neighbouring axial slices through the kidneys (Section IV).

    ``weighting`` None takes ``weighting_for(case_index)`` (the cycle of ``WEIGHTINGS``). The
    anatomy depends on (seed, case_index, difficulty) only, so one case can be drawn in every
    weighting. ``size`` changes the matrix, not the field of view.
    """
    case_index = _check_int("case_index", case_index, 0, 9998)
    seed = _check_int("seed", seed, 0)
    diff = _check_difficulty(difficulty)
    slices_per_case = _check_int("slices_per_case", slices_per_case, 1, 64)
    weighting = weighting_for(case_index) if weighting is None else _check_weighting(weighting)
    size = _check_int("size", size, 64, 1024)

    anatomy_rng = np.random.default_rng([seed, case_index, 0])
    spacing360 = round(_uniform(anatomy_rng, 1.0, 1.2), 3)
    spacing = spacing360 * IMAGE_SIZE / size
    pose = dict(rotation_deg=float(anatomy_rng.uniform(-1, 1) * diff.rotation_deg),
                shift=(float(anatomy_rng.uniform(-1, 1) * diff.translation_mm),
                       float(anatomy_rng.uniform(-1, 1) * diff.translation_mm)))
    thickness = float(anatomy_rng.choice([4.0, 5.0, 6.0]))
    an = _draw_anatomy(anatomy_rng, diff, spacing360)
    scanner = _draw_scanner(np.random.default_rng([seed, case_index, 1]), diff)
    step = thickness if slices_per_case == 1 else min(thickness, 60.0 / (slices_per_case - 1))
    zs = [(i - (slices_per_case - 1) / 2.0) * step for i in range(slices_per_case)]

    rendered = []
    for i, z in enumerate(zs):
        tex_rng = np.random.default_rng([seed, case_index, 2, i])
        tex = _smooth_noise(tex_rng, size, 3.0 * IMAGE_SIZE / size)
        tex_fine = _smooth_noise(tex_rng, size, 1.0 * IMAGE_SIZE / size)
        cv = _Canvas(size, spacing, pose["rotation_deg"], pose["shift"])
        tissue, inst, tumors, _ = _render_tissue(an, cv, z, tex)
        noise_rng = np.random.default_rng([seed, case_index, 3, i, WEIGHTINGS.index(weighting)])
        signal, sigma = _render_signal(tissue, inst, tumors, an, weighting, diff, scanner, noise_rng, tex, tex_fine)
        rendered.append((z, tissue, inst, tumors, signal, sigma))

    # 12-bit storage with a rescale: stored = round(value / slope) + k, value = (stored - k) * slope
    k = scanner["offset_k"]
    top = max(float(r[4].max()) for r in rendered)
    fitting = [s for s in _RESCALE_SLOPES if top / s + k <= 4095]
    good = [s for s in fitting if top / s >= 800] or fitting[:1] or [_RESCALE_SLOPES[-1]]
    slope = good[min(int(scanner["slope_pick"] * len(good)), len(good) - 1)]
    intercept = -k * slope

    case_id = case_id_for(case_index)
    study_uid = _uid("study", seed, difficulty, case_index, size)
    frame_uid = _uid("frame", seed, difficulty, case_index, size)
    series_uid = _uid("series", seed, difficulty, case_index, size, weighting, slices_per_case)
    out = []
    for i, (z, tissue, inst, tumors, signal, sigma) in enumerate(rendered):
        stored = np.clip(np.rint(signal / slope) + k, 0, 4095).astype(np.uint16)
        image = ((stored.astype(np.float32) - np.float32(k)) * np.float32(slope)).astype(np.float32)
        kidney = np.isin(tissue, KIDNEY_TISSUES).astype(np.uint8)
        meta = dict(
            case_index=case_index, seed=seed, z_mm=z, pixel_spacing_mm=spacing, slice_thickness_mm=thickness,
            spacing_between_slices_mm=step, rotation_deg=pose["rotation_deg"], translation_mm=list(pose["shift"]),
            series_description=SERIES_DESCRIPTIONS[weighting], snr=scanner["snr"], noise_sigma=sigma,
            gain=scanner["gain"], offset=scanner["offset"], gamma=scanner["gamma"], bias_amplitude=diff.bias,
            magnetic_field_strength=scanner["field_strength"], rescale_slope=slope, rescale_intercept=intercept,
            tumors=tumors, kidney_area_px=int(kidney.sum()), tissue_labels=tissue,
            study_instance_uid=study_uid, series_instance_uid=series_uid, frame_of_reference_uid=frame_uid,
            sop_instance_uid=_uid("sop", seed, difficulty, case_index, size, weighting, slices_per_case, i),
            **{key: value for key, value in _SEQUENCE[weighting].items()},
        )
        out.append(PhantomSlice(image=image, kidney_mask=kidney, tumor_labels=inst.astype(np.uint16),
                                case_id=case_id, slice_index=i, weighting=weighting, difficulty=difficulty,
                                meta=meta))
    return out


def generate(n_cases: int = 30, seed: int = 0, difficulty: str = "paper", slices_per_case: int = 1,
             weightings: Sequence[str] | str | None = None, size: int = IMAGE_SIZE) -> list[PhantomSlice]:
    """The phantom dataset in memory: ``n_cases`` cases (Section IV: 30 MR images of 360x360).

    Case ``i`` gets ``weightings[i % len(weightings)]`` (all three by default). ``size=356``
    gives the matrix of the Fig. 3 caption.
    """
    n_cases = _check_int("n_cases", n_cases, 1, 9999)
    ws = _check_weightings(weightings)
    _check_difficulty(difficulty)
    slices: list[PhantomSlice] = []
    for i in range(n_cases):
        slices.extend(generate_case(i, seed, difficulty, slices_per_case, ws[i % len(ws)], size))
    return slices


def tissue_label_maps(dataset) -> np.ndarray:
    """The tissue label map (classes of ``TISSUE_NAMES``) of every slice of a phantom ``kts.data.Dataset``.

    Regenerated from the phantom's ``phantom.json`` in ``dataset.source_root`` (the generator is
    deterministic), matched by SOPInstanceUID and resized to the dataset's size like its masks;
    ``kts.synth`` draws training images from them (SynthSeg's recipe, issue 16). Raises
    ``ValueError`` when the dataset is not a kts phantom, or when a regenerated kidney does not
    match the dataset's kidney mask (a phantom written by another generator version).
    """
    from kts.data import resize_mask

    root = Path(dataset.source_root) if getattr(dataset, "source_root", "") else None
    if root is None or not (root / "phantom.json").is_file():
        raise ValueError(f"{root or 'this dataset'}: no phantom.json, so no tissue label maps: they exist only "
                         "for the kts phantom (real series carry kidney masks, not a full anatomical label map)")
    params = json.loads((root / "phantom.json").read_text())
    weightings = params.get("weightings") or list(WEIGHTINGS)
    wanted = set(dataset.index["sop_instance_uid"])
    by_sop: dict[str, np.ndarray] = {}
    for case_id in dict.fromkeys(dataset.index["case_id"]):
        case_index = int(str(case_id).rsplit("-", 1)[-1]) - 1  # case_id_for numbers cases from 1
        for s in generate_case(case_index, params["seed"], params["difficulty"], params["slices_per_case"],
                               weightings[case_index % len(weightings)], params.get("size", IMAGE_SIZE)):
            if s.meta["sop_instance_uid"] in wanted:
                by_sop[s.meta["sop_instance_uid"]] = s.meta["tissue_labels"]
    size = dataset.images.shape[1:3]
    out = np.zeros((len(dataset),) + tuple(size), np.uint8)
    for i, sop in enumerate(dataset.index["sop_instance_uid"]):
        if sop not in by_sop:
            raise ValueError(f"{root}: slice {sop} is not one the phantom's generator draws for these parameters")
        out[i] = resize_mask(by_sop[sop].astype(np.uint8), size)
        if not np.array_equal(np.isin(out[i], KIDNEY_TISSUES), dataset.kidney_masks[i] > 0):
            raise ValueError(f"{root}: the regenerated tissue map of slice {sop} does not match its kidney mask "
                             f"(phantom written by generator {params.get('generator_version')}, this is "
                             f"{GENERATOR_VERSION}): rewrite the phantom")
    return out


def label_map_pool(n_cases: int, seed: int, difficulty: str = "paper", size: int | None = None) -> np.ndarray:
    """Tissue label maps of ``n_cases`` new phantom anatomies (phantom seed ``seed``), one mid-kidney slice each.

    The synth recipe's extra label maps (``kts.synth.SynthConfig.label_pool``): anatomy only, no image of any
    weighting is kept, so a model trained on them has seen more kidney shapes, not more contrasts. Resized
    to ``size`` (default: the phantom's matrix) like ``tissue_label_maps``; uint8 [n_cases, size, size].
    """
    from kts.data import resize_mask

    n_cases = _check_int("n_cases", n_cases, 0, 9999)
    size = IMAGE_SIZE if size is None else _check_int("size", size, 8, 1024)
    out = np.zeros((n_cases, size, size), np.uint8)
    for case_index in range(n_cases):
        labels = generate_case(case_index, seed, difficulty, 1)[0].meta["tissue_labels"]
        out[case_index] = resize_mask(labels.astype(np.uint8), (size, size))
    return out


def tumor_contrast(s: PhantomSlice, rim_px: tuple[int, int] = (2, 6)) -> list[dict[str, Any]]:
    """How visible each tumour of a slice is: its contrast to the kidney around it (issue-12 CNR).

    Measured on the 0..255 image the models see (``kts.data.normalise``). For each tumour
    instance: ``contrast`` = mean(tumour) - mean(rim), where the rim is the tumour-free kidney
    (cortex, medulla, sinus) between ``rim_px[0]`` and ``rim_px[1]`` pixels outside it;
    ``cnr`` = contrast / sqrt((sd_tumor^2 + sd_rim^2) / 2): the separation of the two
    intensity distributions, texture and noise together (a reader delineates |cnr| >~ 1).
    Tumours with fewer than 10 rim pixels (wholly exophytic) are skipped.
    """
    from kts.data import normalise

    image = normalise(s.image)
    labels = s.tumor_labels
    tissue = s.meta["tissue_labels"]
    kidney_free = np.isin(tissue, (CORTEX, MEDULLA)) & (labels == 0)
    out = []
    for label in range(1, int(labels.max(initial=0)) + 1):
        tumor = labels == label
        if not tumor.any():
            continue
        near = ndimage.binary_dilation(tumor, iterations=rim_px[1]) & ~ndimage.binary_dilation(tumor, iterations=rim_px[0])
        rim = near & kidney_free
        if np.count_nonzero(rim) < 10:
            continue
        t, r = image[tumor], image[rim]
        contrast = float(t.mean() - r.mean())
        spread = float(np.sqrt((t.var() + r.var()) / 2.0))
        out.append({"label": label, "weighting": s.weighting, "contrast": contrast,
                    "sd_tumor": float(t.std()), "sd_rim": float(r.std()),
                    "cnr": contrast / spread if spread > 0 else float("inf"), "area_px": int(tumor.sum())})
    return out


# --------------------------------------------------------------------------- DICOM and PNG writing

def dicom_dataset(s: PhantomSlice, header_overrides: Mapping[str, Any] | None = None):
    """The MR Image Storage dataset of one slice (explicit VR little endian, 12 bits stored)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    m = s.meta
    slope, intercept = m["rescale_slope"], m["rescale_intercept"]
    stored = np.rint(s.image / slope - intercept / slope).astype(np.uint16)
    size = s.image.shape[0]
    ps = m["pixel_spacing_mm"]
    origin = -(size - 1) / 2.0 * ps

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = m["sop_instance_uid"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _uid("implementation")
    meta.ImplementationVersionName = "KTS_PHANTOM_" + GENERATOR_VERSION.replace(".", "")

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = m["sop_instance_uid"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "MR"
    ds.Manufacturer = "kts"
    ds.ManufacturerModelName = "kts.phantom " + GENERATOR_VERSION
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "KTS PHANTOM ABDOMEN MR"
    ds.SeriesDescription = m["series_description"]
    ds.PatientName = s.case_id
    ds.PatientID = s.case_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthetic phantom (kts.phantom), no real patient"
    ds.BodyPartExamined = "ABDOMEN"
    ds.ScanningSequence = m["ScanningSequence"]
    ds.SequenceVariant = m["SequenceVariant"]
    ds.ScanOptions = ""
    ds.MRAcquisitionType = m["MRAcquisitionType"]
    ds.SliceThickness = m["slice_thickness_mm"]
    ds.RepetitionTime = m["RepetitionTime"]
    ds.EchoTime = m["EchoTime"]
    ds.EchoTrainLength = m["EchoTrainLength"]
    ds.FlipAngle = m["FlipAngle"]
    ds.MagneticFieldStrength = m["magnetic_field_strength"]
    ds.ImagingFrequency = round(42.577478 * m["magnetic_field_strength"], 4)
    ds.SpacingBetweenSlices = m["spacing_between_slices_mm"]
    ds.PatientPosition = "FFS"
    ds.StudyInstanceUID = m["study_instance_uid"]
    ds.SeriesInstanceUID = m["series_instance_uid"]
    ds.StudyID = "1"
    ds.SeriesNumber = 1 + WEIGHTINGS.index(s.weighting)
    ds.InstanceNumber = s.slice_index + 1
    ds.ImagePositionPatient = [round(origin, 4), round(origin, 4), round(m["z_mm"], 4)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = m["frame_of_reference_uid"]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = round(m["z_mm"], 4)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.PixelSpacing = [round(ps, 6), round(ps, 6)]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    lo, hi = np.percentile(s.image[s.meta["tissue_labels"] > 0], [1.0, 99.5])
    ds.WindowCenter = round(float(lo + hi) / 2, 1)
    ds.WindowWidth = round(max(float(hi - lo), 1.0), 1)
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = slope
    ds.RescaleType = "US"
    ds.BurnedInAnnotation = "NO"
    ds.PixelData = stored.astype("<u2").tobytes()
    for keyword, value in _check_overrides(header_overrides).items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def _check_overrides(header_overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    from pydicom.datadict import tag_for_keyword

    if header_overrides is None:
        return {}
    if not isinstance(header_overrides, Mapping):
        raise ValueError(f"header_overrides must be a dict of DICOM keyword -> value; got {type(header_overrides).__name__}")
    bad = [k for k in header_overrides if not isinstance(k, str) or tag_for_keyword(k) is None]
    if bad:
        raise ValueError(f"header_overrides has keys that are not DICOM keywords: {bad}; use e.g. 'PatientName'")
    protected = {"PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                 "SamplesPerPixel", "RescaleSlope", "RescaleIntercept"}
    clash = sorted(protected & set(header_overrides))
    if clash:
        raise ValueError(f"header_overrides may not change {clash}: the masks and pixels depend on them")
    return dict(header_overrides)


def write_dicom(s: PhantomSlice, path: str | os.PathLike, header_overrides: Mapping[str, Any] | None = None):
    """Write one slice as a DICOM Part 10 file (atomically); returns the dataset written."""
    ds = dicom_dataset(s, header_overrides)
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return ds


def write_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 (8-bit) or uint16 (16-bit) greyscale PNG atomically; values kept exactly."""
    from PIL import Image

    if array.dtype == np.uint8:
        img = Image.fromarray(np.ascontiguousarray(array))
    elif array.dtype == np.uint16:
        img = Image.fromarray(np.ascontiguousarray(array).astype("<u2"))
    else:
        raise ValueError(f"{path}: PNG masks must be uint8 or uint16; got {array.dtype}")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def _dataset_parameters(n_cases, seed, difficulty, slices_per_case, weightings, header_overrides, size) -> dict[str, Any]:
    overrides = _check_overrides(header_overrides)
    digest = None
    if overrides:  # record which keywords were overridden and a digest, never the values (privacy)
        digest = hashlib.sha256(json.dumps({k: str(v) for k, v in overrides.items()}, sort_keys=True).encode()).hexdigest()
    return {
        "generator": GENERATOR, "generator_version": GENERATOR_VERSION, "seed": seed, "difficulty": difficulty,
        "n_cases": n_cases, "slices_per_case": slices_per_case, "weightings": list(weightings),
        "size": size, "header_overrides": sorted(overrides), "header_overrides_sha256": digest,
    }


CSV_COLUMNS = (
    "case_id", "slice_index", "weighting", "series_description", "difficulty", "n_tumors", "tumor_areas_px",
    "exophytic", "kidney_area_px", "tumor_burden", "burden_category", "snr", "pixel_spacing_mm",
    "slice_thickness_mm", "slice_position_mm", "rescale_slope", "rescale_intercept", "magnetic_field_strength",
    "study_instance_uid", "series_instance_uid", "sop_instance_uid", "dicom_file", "kidney_mask_file",
    "tumor_mask_file",
)


def _write_case(case_slices: list[PhantomSlice], folder: Path, header_overrides) -> list[dict[str, Any]]:
    rows = []
    for s in case_slices:
        dcm = folder / "dicom" / f"IM_{s.slice_index + 1:04d}.dcm"
        ds = write_dicom(s, dcm, header_overrides)
        sop = str(ds.SOPInstanceUID)
        kidney_png = folder / "masks" / f"{sop}_kidney.png"
        tumor_png = folder / "masks" / f"{sop}_tumor.png"
        write_png((s.kidney_mask > 0).astype(np.uint8) * 255, kidney_png)
        write_png(s.tumor_labels.astype(np.uint16), tumor_png)
        burden = s.tumor_burden
        rel = lambda p: p.relative_to(folder.parent).as_posix()  # noqa: E731
        rows.append(dict(
            case_id=s.case_id, slice_index=s.slice_index, weighting=s.weighting,
            series_description=s.meta["series_description"], difficulty=s.difficulty, n_tumors=s.n_tumors,
            tumor_areas_px=";".join(str(t["area_px"]) for t in s.meta["tumors"]),
            exophytic=";".join(str(int(t["exophytic"])) for t in s.meta["tumors"]),
            kidney_area_px=s.meta["kidney_area_px"], tumor_burden=f"{burden:.4f}",
            burden_category=burden_category(burden), snr=f"{s.meta['snr']:.2f}",
            pixel_spacing_mm=f"{s.meta['pixel_spacing_mm']:.6g}", slice_thickness_mm=s.meta["slice_thickness_mm"],
            slice_position_mm=f"{s.meta['z_mm']:.4g}", rescale_slope=s.meta["rescale_slope"],
            rescale_intercept=s.meta["rescale_intercept"],
            magnetic_field_strength=s.meta["magnetic_field_strength"],
            study_instance_uid=str(ds.StudyInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID),
            sop_instance_uid=sop, dicom_file=rel(dcm), kidney_mask_file=rel(kidney_png),
            tumor_mask_file=rel(tumor_png)))
    return rows


def write_dataset(root: str | os.PathLike, n_cases: int = 30, seed: int = 0, difficulty: str = "paper",
                  slices_per_case: int = 1, weightings: Sequence[str] | str | None = None,
                  header_overrides: Mapping[str, Any] | None = None, size: int = IMAGE_SIZE) -> Path:
    """Write the phantom in the on-disk layout (DICOM series, PNG masks, cases.csv, phantom.json).

    The whole dataset is written into a hidden temporary folder beside ``root`` and renamed
    into place at the end, so an interrupted run leaves nothing. If ``root`` already holds a
    phantom with the same parameters (its ``phantom.json``), it is returned untouched; if it
    holds one with different parameters, or anything else, ``KtsInputError`` is raised (delete
    it or choose another root; :func:`default_root` names one folder per parameter set).
    ``header_overrides`` (DICOM keyword -> value, None deletes) is applied to every file, e.g.
    to test that a patient name never reaches outputs; phantom.json records only its keywords.
    """
    root = Path(root)
    n_cases = _check_int("n_cases", n_cases, 1, 9999)
    seed = _check_int("seed", seed, 0)
    _check_difficulty(difficulty)
    slices_per_case = _check_int("slices_per_case", slices_per_case, 1, 64)
    ws = _check_weightings(weightings)
    size = _check_int("size", size, 64, 1024)
    params = _dataset_parameters(n_cases, seed, difficulty, slices_per_case, ws, header_overrides, size)
    if root.exists():
        existing = _existing_parameters(root)
        if existing == params:
            return root
        if existing is None and root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        else:
            _raise_mismatch(root, existing, params)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        rows: list[dict[str, Any]] = []
        for i in range(n_cases):
            case = generate_case(i, seed, difficulty, slices_per_case, ws[i % len(ws)], size)
            rows.extend(_write_case(case, tmp / case_id_for(i), header_overrides))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text(tmp / "cases.csv", buffer.getvalue())
        write_json(tmp / "phantom.json", params)
        try:
            os.rename(tmp, root)
        except OSError:
            if _existing_parameters(root) == params:  # another process finished the same dataset first
                shutil.rmtree(tmp, ignore_errors=True)
                return root
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _existing_parameters(root: Path) -> dict[str, Any] | None:
    path = root / "phantom.json"
    if not path.is_file():
        return None
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text(encoding="utf-8"))
    return None


def _raise_mismatch(root: Path, existing: dict[str, Any] | None, params: dict[str, Any]) -> None:
    if existing is None:
        raise KtsInputError(root, "exists and is not a kts phantom folder (no readable phantom.json); "
                                  "choose a new or empty folder")
    differ = sorted(k for k in set(existing) | set(params) if existing.get(k) != params.get(k))
    raise KtsInputError(root / "phantom.json",
                        f"holds a phantom made with different parameters (differs in: {', '.join(differ)}); "
                        "delete the folder or choose another root (kts.phantom.default_root names one per setting)")


def default_root(seed: int = 0, difficulty: str = "paper", n_cases: int = 30, slices_per_case: int = 1,
                 size: int = IMAGE_SIZE, data_dir: str | os.PathLike | None = None) -> Path:
    """``<data_dir>/phantom-<difficulty>-seed<seed>[-n<n_cases>][-s<slices_per_case>][-px<size>]``.

    Only non-default values appear, so the default dataset is ``data/phantom-paper-seed0``;
    ``data_dir`` defaults to ``kts.config.data_dir()``.
    """
    _check_difficulty(difficulty)
    seed = _check_int("seed", seed, 0)
    name = f"phantom-{difficulty}-seed{seed}"
    if n_cases != 30:
        name += f"-n{_check_int('n_cases', n_cases, 1)}"
    if slices_per_case != 1:
        name += f"-s{_check_int('slices_per_case', slices_per_case, 1)}"
    if size != IMAGE_SIZE:
        name += f"-px{_check_int('size', size, 64, 1024)}"
    return (Path(data_dir) if data_dir is not None else config.data_dir()) / name
