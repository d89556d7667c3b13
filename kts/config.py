"""Run profiles, folders and the printed configuration every notebook starts with.

Two speeds (README, "Two profiles"): ``paper`` holds the paper's settings (section IV:
320x320 inputs, the full training recipe with early stopping, a MobileNetV2 FPN Mask R-CNN,
errata E29);
``quick`` is a small profile for CI and classrooms that still runs every code path.
Each :class:`Profile` holds its CU-Net recipe (:class:`TrainConfig`) and its Mask R-CNN
(:class:`MaskRCNNConfig`); everything else reads them from there.
A notebook's ``parameters`` cell takes ``PROFILE = kts.config.default_profile()``, which
reads the ``KTS_PROFILE`` environment variable (nbval injects no parameters) and falls back
to ``"paper"``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

PROFILE_ENV = "KTS_PROFILE"
DATA_ENV = "KTS_DATA_DIR"
RESULTS_ENV = "KTS_RESULTS_DIR"
WORK_ENV = "KTS_WORK_DIR"
SOURCE_ENV = "KTS_SOURCE_ROOT"  # a data folder in kts' on-disk layout to use instead of the phantom


FLIPS = ("horizontal", "vertical")
INTENSITY = ("none", "random_lut", "synth")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The CU-Net training recipe of section IV (``kts.train.train_cunet``); each profile holds one.

    Defaults are the paper profile's (errata E10 for values the paper leaves open)."""

    epochs: int = 100
    batch_size: int = 4
    learning_rate: float = 1e-3
    flip: str = "horizontal"           # the flip that doubles the training set (section IV)
    early_stopping_patience: int = 10  # EarlyStopping on val_loss, restore_best_weights
    reduce_lr_patience: int = 5        # ReduceLROnPlateau on val_loss
    reduce_lr_factor: float = 0.5
    min_learning_rate: float = 1e-6
    monitor: str = "val_loss"
    # Not in the paper (section IV: "flips and other techniques"): "random_lut" passes half of the
    # training images through a random smooth intensity curve, so the CU-Net cannot lean on one
    # MR weighting's grey levels (notebook 07 measures what it buys on an unseen contrast);
    # "synth" re-synthesises training images from their tissue label maps (kts.synth, SynthSeg).
    intensity: str = "none"

    def __post_init__(self):
        for name in ("epochs", "batch_size", "early_stopping_patience", "reduce_lr_patience"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate!r}")
        if self.flip not in FLIPS:
            raise ValueError(f"flip must be one of {FLIPS}, got {self.flip!r}")
        if self.intensity not in INTENSITY:
            raise ValueError(f"intensity must be one of {INTENSITY}, got {self.intensity!r}")
        if not 0 < self.reduce_lr_factor < 1:
            raise ValueError(f"reduce_lr_factor must be in (0, 1), got {self.reduce_lr_factor!r}")


# The synth recipe's schedule (errata A5): the profile's, stretched by these factors. Its images change every
# epoch, so the validation loss on real slices keeps falling long after the paper's patience would have stopped
# (paper profile, T1-pre left out: stopped at epoch 53 with patience 10; still improving at epoch 146 with
# patience 30). SynthSeg trains far longer still.
SYNTH_SCHEDULE = {"epochs": 2, "early_stopping_patience": 3, "reduce_lr_patience": 2}


# the choices of MaskRCNNConfig (kts.maskrcnn builds the model from it)
FLIP_MODES = ("double", "dihedral", "random", "none")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")
BACKBONES = ("resnet18", "mobilenetv2")
MASK_PASTES = ("exact", "v1")


@dataclasses.dataclass(frozen=True)
class MaskRCNNConfig:
    """Size of the Mask R-CNN (section III.B) and of its training recipe (section IV).

    Each :class:`Profile` holds one (``get_profile("paper").maskrcnn``); the field defaults
    are Model Garden's where it has one. Sizes in pixels of the kidney crop.
    ``flip``: ``"double"`` adds a horizontally flipped copy of every training crop (the
    paper's "2x" augmentation, section IV), ``"random"`` flips each sample with p=0.5
    (Model Garden's ``aug_rand_hflip``), ``"none"`` trains on the crops as given,
    ``"dihedral"`` (not in the paper) adds all 8 quarter-turn/flip copies of every crop.
    ``optimizer`` (``"adam"`` or ``"sgd"`` with momentum 0.9) and ``lr_schedule``
    (``"constant"`` or ``"cosine"`` decay to 0 over the training steps, both after a linear
    ``warmup_steps`` ramp) choose the recipe; ``rpn_*``, ``roi_foreground_fraction`` and
    ``mask_loss_weight`` are passed to Model Garden (their defaults are Model Garden's).
    """

    name: str = "custom"
    backbone: str = "resnet18"
    mobilenet_width: float = 0.5
    crop_size: int = 128
    batch_size: int = 2
    min_level: int = 2
    max_level: int = 5
    anchor_size: float = 3.0
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    num_scales: int = 1
    fpn_filters: int = 64
    rpn_filters: int = 64
    fc_dims: int = 256
    pre_nms_top_k: int = 1000
    num_proposals: int = 256
    test_num_proposals: int = 100
    num_sampled_rois: int = 64
    mask_convs: int = 2
    mask_filters: int = 64
    mask_crop_size: int = 56
    batched_nms: bool = True
    max_instances: int = 20
    max_detections: int = 20
    norm_momentum: float = 0.9
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    optimizer: str = "adam"
    lr_schedule: str = "constant"
    rpn_match_threshold: float = 0.7
    rpn_unmatched_threshold: float = 0.3
    rpn_batch_size_per_im: int = 256
    rpn_score_loss_weight: float | None = None
    roi_foreground_fraction: float = 0.25
    mask_loss_weight: float = 1.0
    weight_decay: float = 0.0
    flip: str = "double"
    scale_jitter: tuple[float, float] = (1.0, 1.0)
    intensity_jitter: float = 0.0
    score_threshold: float = 0.5
    mask_paste: str = "exact"
    overlap_drop: float = 0.5

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}; got {self.backbone!r}")
        if self.flip not in FLIP_MODES:
            raise ValueError(f"flip must be one of {FLIP_MODES}; got {self.flip!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {self.optimizer!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}; got {self.lr_schedule!r}")
        if not 0.0 <= self.rpn_unmatched_threshold <= self.rpn_match_threshold <= 1.0:
            raise ValueError("need 0 <= rpn_unmatched_threshold <= rpn_match_threshold <= 1; got "
                             f"{self.rpn_unmatched_threshold}, {self.rpn_match_threshold}")
        stride = 2 ** self.max_level
        if self.crop_size <= 0 or self.crop_size % stride:
            raise ValueError(
                f"crop_size must be a positive multiple of 2**max_level = {stride}; got {self.crop_size}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        if self.mask_paste not in MASK_PASTES:
            raise ValueError(f"mask_paste must be one of {MASK_PASTES}; got {self.mask_paste!r}")
        lo, hi = (float(v) for v in self.scale_jitter)
        if not 0.0 < lo <= hi:
            raise ValueError(f"scale_jitter must be (min, max) with 0 < min <= max; got {self.scale_jitter!r}")
        for name in ("score_threshold", "overlap_drop", "intensity_jitter"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {getattr(self, name)!r}")
        if self.rpn_score_loss_weight is not None and self.rpn_score_loss_weight <= 0:
            raise ValueError(f"rpn_score_loss_weight must be > 0 or None; got {self.rpn_score_loss_weight!r}")
        object.__setattr__(self, "aspect_ratios", tuple(float(a) for a in self.aspect_ratios))
        object.__setattr__(self, "scale_jitter", (lo, hi))

    @property
    def effective_rpn_score_weight(self) -> float:
        """The RPN objectness loss weight passed to Model Garden (errata E38).

        Model Garden divides the summed anchor BCE by ``num_sampled_rois`` (its
        ``RpnScoreLoss(tf.shape(box_outputs)[1])``), not by the ``rpn_batch_size_per_im``
        anchors it samples; ``None`` (the default) rescales by their ratio so that the loss
        is the mean BCE over the sampled anchors. ``1.0`` is Model Garden's literal weight.
        """
        if self.rpn_score_loss_weight is not None:
            return float(self.rpn_score_loss_weight)
        return float(self.num_sampled_rois) / float(self.rpn_batch_size_per_im)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["aspect_ratios"] = list(self.aspect_ratios)
        out["scale_jitter"] = list(self.scale_jitter)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MaskRCNNConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown Mask R-CNN config keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)

    def architecture(self) -> dict[str, Any]:
        """The fields that fix the shapes of the weights (a checkpoint needs all equal)."""
        keys = ("backbone", "mobilenet_width", "crop_size", "min_level", "max_level", "aspect_ratios",
                "num_scales", "fpn_filters", "rpn_filters", "fc_dims", "mask_convs", "mask_filters")
        d = self.to_dict()
        return {k: d[k] for k in keys}


@dataclasses.dataclass(frozen=True)
class Profile:
    """Every size and length a notebook needs; see ``PROFILES`` for the two values."""

    name: str
    # data (section III.A.2 and IV): 30 MR slices, 360x360, resized to ``image_size``
    n_cases: int
    slices_per_case: int
    difficulty: str
    image_size: int
    # CU-Net (Algorithm 1) and its training recipe (section IV)
    cunet_base_filters: int  # z
    cunet_training: TrainConfig
    # Mask R-CNN (section III.B) and its training steps (section IV)
    maskrcnn: MaskRCNNConfig
    maskrcnn_steps: int
    # Table I split study: seeds per partition, and the partitions (the quick profile runs two of the four)
    seeds: int
    table1_partitions: tuple[str, ...] = ("TD-70% VD-6%", "TD-75% VD-8%", "TD-65% VD-15%", "TD-60% VD-20%")
    # unseen MR contrasts (notebook 07): the weightings left out, one CU-Net each
    contrasts_left_out: tuple[str, ...] = ("t1_post", "t2", "t1_pre")
    # `kts run`: a cell with no reply from its kernel for this long is taken as hung (a lost kernel message
    # once stalled a run for good) and its notebook is run once more; far above the profile's longest cell
    cell_timeout_s: int = 12 * 3600

    def cunet_config(self, epochs: int | None = None, intensity: str | None = None) -> TrainConfig:
        """The profile's CU-Net recipe (section IV), with another epoch budget or intensity recipe if given;
        the ``"synth"`` recipe trains on a longer schedule (:data:`SYNTH_SCHEDULE`)."""
        config = dataclasses.replace(self.cunet_training, intensity=intensity or self.cunet_training.intensity)
        if config.intensity == "synth":
            config = dataclasses.replace(config, **{name: getattr(config, name) * factor
                                                    for name, factor in SYNTH_SCHEDULE.items()})
        return dataclasses.replace(config, epochs=epochs or config.epochs)


PROFILES: dict[str, Profile] = {
    "paper": Profile(
        name="paper", n_cases=30, slices_per_case=1, difficulty="paper", image_size=320, cunet_base_filters=16,
        cunet_training=TrainConfig(epochs=100, batch_size=4, early_stopping_patience=10, reduce_lr_patience=5),
        # MobileNetV2 FPN Mask R-CNN on 128x128 kidney crops, batch 8 (errata E29, E38)
        maskrcnn=MaskRCNNConfig(name="paper", backbone="mobilenetv2", mobilenet_width=1.0, crop_size=128, batch_size=8,
                                anchor_size=3.0, num_scales=3, rpn_match_threshold=0.45, num_sampled_rois=64,
                                learning_rate=1e-3, lr_schedule="cosine", weight_decay=4e-5, flip="dihedral",
                                scale_jitter=(0.8, 1.25), intensity_jitter=0.3),
        maskrcnn_steps=300, seeds=3,
    ),
    "quick": Profile(
        name="quick", n_cases=30, slices_per_case=1, difficulty="paper", image_size=128, cunet_base_filters=8,
        cunet_training=TrainConfig(epochs=15, batch_size=4, early_stopping_patience=5, reduce_lr_patience=3),
        # MobileNetV2 (width 0.5) on 64x64 crops, batch 8
        maskrcnn=MaskRCNNConfig(name="quick", backbone="mobilenetv2", mobilenet_width=0.5, crop_size=64, batch_size=8,
                                anchor_size=1.5, num_scales=3, rpn_match_threshold=0.45, pre_nms_top_k=300,
                                num_proposals=64, test_num_proposals=50, num_sampled_rois=32, mask_crop_size=28,
                                learning_rate=2e-3, lr_schedule="cosine", weight_decay=4e-5, flip="dihedral",
                                scale_jitter=(0.8, 1.25), intensity_jitter=0.3),
        maskrcnn_steps=150, seeds=1, table1_partitions=("TD-70% VD-6%", "TD-60% VD-20%"),
        contrasts_left_out=("t1_pre",), cell_timeout_s=30 * 60,
    ),
}


def default_profile() -> str:
    """The profile name from ``$KTS_PROFILE``, else ``"paper"``."""
    return os.environ.get(PROFILE_ENV, "paper")


def get_profile(name: str) -> Profile:
    """Return the named profile; an unknown name or a non-string raises ``ValueError``."""
    if not isinstance(name, str):
        raise ValueError(f"profile name must be a string, one of {sorted(PROFILES)}; got {type(name).__name__} {name!r}")
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}: choose one of {sorted(PROFILES)}") from None


def check_parameters(values: dict[str, Any], expected: dict[str, type | tuple[type, ...]]) -> None:
    """Check notebook parameters' types (papermill injects whatever it is given).

    ``expected`` maps a parameter name to the type(s) it must have; raises ``ValueError``
    naming the parameter, the type it got and the one it needs.
    """
    for key, types in expected.items():
        if key not in values:
            raise ValueError(f"parameter {key} is missing")
        value = values[key]
        ok_types = types if isinstance(types, tuple) else (types,)
        if isinstance(value, bool) and bool not in ok_types:
            ok = False
        else:
            ok = isinstance(value, ok_types)
        if not ok:
            names = " or ".join(t.__name__ for t in ok_types)
            raise ValueError(f"parameter {key} must be {names}; got {type(value).__name__} {value!r}")


def project_root() -> Path:
    """The kts checkout the user works in: the nearest folder above the working directory that
    holds ``pyproject.toml`` and ``kts/`` (notebooks run from ``notebooks/``); else the checkout
    this package was installed from in editable mode (student copies written outside it, Colab);
    else the working directory."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "kts").is_dir():
            return folder
    installed_from = Path(__file__).resolve().parent.parent
    if (installed_from / "pyproject.toml").is_file() and (installed_from / "data_manifest.csv").is_file():
        return installed_from
    return here


def _folder(env: str, default: str, profile: str | None) -> Path:
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser()
    base = project_root() / default
    return base / profile if profile and profile != "paper" else base


def data_dir() -> Path:
    """Where generated and downloaded data live: ``$KTS_DATA_DIR`` or ``<checkout>/data``."""
    return _folder(DATA_ENV, "data", None)


def results_dir(profile: str | None = None) -> Path:
    """Figures and tables: ``$KTS_RESULTS_DIR``, else ``<checkout>/results`` (paper profile) or
    ``<checkout>/results/<profile>`` (so a quick run never overwrites the committed paper results)."""
    return _folder(RESULTS_ENV, "results", profile)


def work_dir(profile: str | None = None) -> Path:
    """Checkpoints and histories: ``$KTS_WORK_DIR``, else ``<checkout>/work`` (paper) or ``work/<profile>``."""
    return _folder(WORK_ENV, "work", profile or "paper")


def git_commit(dirty_of: str | os.PathLike | None = None) -> str | None:
    """HEAD's commit of the checkout kts runs from (None outside git); with ``dirty_of`` (a folder),
    ``-dirty`` is appended when that folder has uncommitted changes other than shipped weights."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=here)
        commit = head.stdout.strip()
        if not commit or dirty_of is None:
            return commit or None
        status = subprocess.run(["git", "status", "--porcelain", "--", str(dirty_of)], capture_output=True,
                                text=True, timeout=10, cwd=here)
    except (OSError, subprocess.SubprocessError):
        return None
    changed = [line for line in status.stdout.splitlines() if "weights/" not in line]
    return commit + ("-dirty" if changed else "")


def cpu() -> dict[str, Any]:
    """The CPU model and the vector extensions that decide TF's kernels: results are bitwise repeatable
    on one kind of CPU, not across kinds (README, "Same seed, same bits")."""
    model, flags = None, []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = [f for f in line.split(":", 1)[1].split()
                         if f.startswith(("avx512f", "avx512_bf16", "avx512_vnni", "amx", "avx2", "fma"))]
    except OSError:  # not Linux
        pass
    return {"cpu_model": model or platform.processor() or None, "cpu_flags": sorted(set(flags))}


def versions() -> dict[str, str]:
    """Versions of Python and of the libraries whose behaviour the results depend on."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("kts", "tensorflow", "keras", "tf-keras", "tf-models-official", "numpy",
                 "pydicom", "scikit-image", "highdicom", "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


# --- known-harmless noise, kept out of notebook outputs and ``kts run``'s console -------------
# One list, used by the notebooks (``import kts`` in a kernel calls quiet_known_noise), by
# print_config (the first TensorFlow device query, where CUDA reports a missing GPU) and by
# ``kts run`` (the kernels' environment). Each entry names one message; everything else shows.

NOISE_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}  # TF's C++ INFO and WARNING lines (oneDNN, CPU features, no CUDA driver)
NOISE_WARNINGS = (
    # tf_keras functional models (TF Model Garden's Mask R-CNN) called with a dict holding extra keys
    (r"Input dict contained keys .* which did not match any model input", UserWarning),
)
NOISE_STDERR_LINES = (
    # TF's CUDA probe on a machine without a GPU (an ERROR line that TF_CPP_MIN_LOG_LEVEL=2 keeps):
    # "failed call to cuInit: ... UNKNOWN ERROR (303)" or "... CUDA_ERROR_NO_DEVICE"; kts runs on the CPU
    r"failed call to cuInit",
    # tf.data graphs written by a newer TF op registry (TF 2.20 with Model Garden's input ops):
    # "NodeDef mentions attribute use_unbounded_threadpool which is not in the op definition"
    r"NodeDef mentions attribute use_unbounded_threadpool",
    # oneDNN's int32 kernels on CPUs without AVX-512: "oneDNN supports DT_INT32 only on platforms
    # with AVX-512. Falling back to the default Eigen-based implementation"; the results are the same
    r"oneDNN supports DT_INT32 only on platforms with AVX-512",
    # Grappler's cost model has no estimate for Model Garden's CropAndResize with unknown batch sizes
    # ("op_level_cost_estimator.cc:699] Error in PredictCost() for the op: op: \"CropAndResize\" ..."):
    # a W line about graph optimisation costs, printed during the split study; the results are the same
    r"Error in PredictCost\(\) for the op",
)


def quiet_known_noise() -> None:
    """Hide the known-harmless messages listed above, and nothing else.

    Sets ``TF_CPP_MIN_LOG_LEVEL=2`` unless the user set it (it takes effect when TensorFlow is
    imported, which ``import kts`` does not do) and ignores the warnings of ``NOISE_WARNINGS``
    by message and category; other warnings, TF's C++ errors and Python errors still show.
    """
    for key, value in NOISE_ENV.items():
        os.environ.setdefault(key, value)
    for message, category in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def _is_noise(line: str) -> bool:
    return any(re.search(pattern, line) for pattern in NOISE_STDERR_LINES)


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
    """Drop the ``NOISE_STDERR_LINES`` that C/C++ code writes to file descriptor 2 in this block.

    TensorFlow's C++ logging bypasses Python (``warnings`` and ``sys.stderr`` cannot filter it)
    and a kernel forwards descriptor 2 to the notebook. The block's descriptor-2 output goes to a
    temporary file; on exit every other line is written to ``sys.stderr``, in order.
    """
    try:
        sys.stderr.flush()
        saved: int | None = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no descriptor 2 (or no sys.stderr) to redirect
        saved = None
    if saved is None:
        yield
        return
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode(errors="replace").splitlines(keepends=True)
                    if not _is_noise(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def print_config(seed: int | None = None, profile: str | None = None) -> dict[str, Any]:
    """Print (and return) versions, seed, profile and compute device, as MONAI tutorials do."""
    info: dict[str, Any] = dict(versions())
    info["platform"] = f"{platform.system()} {platform.machine()}"
    info["cpu_count"] = os.cpu_count()
    try:
        with filtered_stderr():  # the first device query probes CUDA: "failed call to cuInit" on CPUs
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
        info["device"] = f"{len(gpus)} GPU" if gpus else "CPU"
    except Exception:  # pragma: no cover - TF missing
        info["device"] = "unknown"
    if seed is not None:
        info["seed"] = seed
    if profile is not None:
        info["profile"] = profile
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}} : {value}")
    return info
