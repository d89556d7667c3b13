"""``python -m kts.bench``: how fast kts runs on this machine, against this machine's ceiling.

Speed goals live here, never in timed tests. Sections (``--sections``):

``ceiling``         FP32 GFLOP/s of a large matrix product (TensorFlow and numpy), one core and all cores;
                    the faster all-core one is the ceiling every fraction is taken of (fp32_ceiling)
``cunet``           CU-Net (Algorithm 1, section III.A.3) at the paper's settings (320x320x1, z=16,
                    batch 4, section IV): forward FLOPs (TF profiler vs :func:`kts.cunet.forward_flops`),
                    training and inference images/s, the fraction of the ceiling, per-layer times
``train_step``      one CU-Net training step as ``train_cunet`` runs it, taken apart: forward, backward,
                    Adam, Keras' step, the recipe's metrics, input pipeline and epoch loop, checkpoint
``variations``      what could lift CU-Net: threads, batch 2/4/8, oneDNN off, op determinism, XLA, bf16,
                    fused batch norm
``torch``           the same architecture in PyTorch (channels-last), when ``torch`` is installed
``input_pipeline``  training from :func:`kts.train.make_dataset` vs from pre-materialised tensors
``maskrcnn``        Mask R-CNN (section III.B): seconds per training step, ms per crop, tracing cost
``data``            phantom generation and DICOM extraction, slices per second
``e2e_quick``       ``python -m kts run --profile quick``: wall time and peak resident memory
``e2e_paper``       the paper profile (hours): only when named explicitly

Every figure is the median of several repeats after a warm-up; each measurement runs in a
fresh subprocess (``--worker``) so thread settings and oneDNN flags take effect before
TensorFlow starts. A section that cannot run (a module or ``torch`` missing) is written
with ``null`` figures and ``"skipped": "<reason>"``. Results go to ``results/bench.json``
and ``results/bench.md`` (atomically), and the table is printed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from kts import io as kts_io
from kts.io import markdown_table

SCHEMA_VERSION = 1
SECTIONS = ("ceiling", "cunet", "train_step", "variations", "torch", "input_pipeline", "maskrcnn", "data",
            "e2e_quick", "e2e_paper")
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s != "e2e_paper")
QUICK_SECTIONS = ("ceiling", "cunet", "train_step", "input_pipeline", "data")


def cunet_settings(profile: str) -> dict[str, int]:
    """The CU-Net a profile trains (``kts.config.PROFILES``): input size, z and batch."""
    from kts import config

    p = config.get_profile(profile)
    return dict(size=p.image_size, z=p.cunet_base_filters, batch=p.cunet_training.batch_size)


PAPER_CUNET_PARAMS = 2_164_305
GOALS = {
    "cunet_train_fraction_of_ceiling": (">=", 0.60),
    "cunet_infer_fraction_of_ceiling": (">=", 0.75),
    "kts_over_torch_train": (">=", 1.3),
    "kts_over_torch_infer": (">=", 1.3),
    "input_pipeline_overhead_pct": ("<=", 5.0),
    "e2e_quick_wall_min": ("<=", 10.0),
    "e2e_quick_peak_rss_gb": ("<=", 2.0),
    "e2e_paper_wall_min_per_seed": ("<=", 60.0),
}
SINGLE_CORE_ENV = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "1",
                   "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- small helpers

def median_of_repeats(values: Sequence[float], unit: str) -> dict[str, Any]:
    """A figure: its repeats, their median, and the unit."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("median_of_repeats needs at least one repeat")
    return {"repeats": [round(v, 6) for v in values], "median": round(statistics.median(values), 6),
            "min": round(min(values), 6), "max": round(max(values), 6), "unit": unit}


def median_of(figure: dict | None) -> float | None:
    return None if not figure else figure.get("median")


def time_repeats(fn: Callable[[], Any], warmup: int, repeats: int, min_time: float = 0.2) -> list[float]:
    """Seconds per call of ``fn``: ``warmup`` calls, then ``repeats`` timings, each of enough
    back-to-back calls to last about ``min_time`` seconds (short calls are averaged)."""
    t0 = time.perf_counter()
    for _ in range(max(warmup, 1)):
        fn()
    per_call = (time.perf_counter() - t0) / max(warmup, 1)
    inner = max(1, math.ceil(min_time / max(per_call, 1e-9))) if per_call < min_time else 1
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - t0) / inner)
    return out


def goal(name: str, value: float | None, **extra: Any) -> dict[str, Any]:
    """``{"goal": ">= 0.6", "value": v, "met": bool}``; ``met`` is None when ``value`` is None."""
    op, target = GOALS[name]
    met = None if value is None else bool(value >= target if op == ">=" else value <= target)
    return {"goal": f"{op} {target:g}", "value": None if value is None else round(float(value), 4), "met": met,
            **extra}


def cunet_param_count(z: int = 16, mu: Sequence[int] = (1, 2, 4, 8), channels: int = 1, k: int = 3) -> int:
    """Parameters (batch-norm moving statistics included, as Keras counts them) of the CU-Net
    of Algorithm 1 with batch norm; used to check that the PyTorch peer is the same network."""
    def conv(cin: int, cout: int, size: int) -> int:
        return size * size * cin * cout + cout

    def block(cin: int, cout: int) -> int:
        return conv(cin, cout, k) + 4 * cout + conv(cout, cout, k) + 4 * cout

    widths = [z * m for m in mu]
    total, cin = 0, channels
    for w in widths:
        total += block(cin, w)
        cin = w
    total += block(cin, 2 * widths[-1])
    cin = 2 * widths[-1]
    for w in reversed(widths):
        total += conv(cin, w, k) + block(2 * w, w)
        cin = w
    return total + conv(cin, 1, 1)


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, library versions, oneDNN flag, date (no host or user names)."""
    from importlib import metadata

    from kts import config

    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for dist in ("tensorflow", "keras", "numpy", "torch", "tf-models-official"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        affinity = os.cpu_count()
    return {**config.cpu(), "cores": os.cpu_count(), "cores_usable": affinity,
            "memory_gb": mem_gb, "versions": versions,
            "onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on for x86 TF >= 2.9)"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "platform": f"{platform.system()} {platform.machine()}"}


# ----------------------------------------------------------------------------- markdown

def render_markdown(results: dict[str, Any]) -> str:
    """The short table of ``bench.md``: every figure with its goal, then the goals' verdicts."""
    m = results.get("machine", {})
    rows: list[tuple] = []

    def add(section: str, name: str, figure: Any, unit: str, goal_name: str | None = None):
        value = median_of(figure) if isinstance(figure, dict) else figure
        g = results.get("goals", {}).get(goal_name) if goal_name else None
        rows.append((section, name, value, unit, g["goal"] if g else None, g["met"] if g else None))

    c = results.get("ceiling", {})
    add("ceiling", f"TF matmul {c.get('n') or 'n'}², all cores", c.get("tf_all_core"), "GFLOP/s")
    add("ceiling", "TF matmul, 1 core", c.get("tf_single_core"), "GFLOP/s")
    add("ceiling", "numpy matmul, all cores", c.get("numpy_all_core"), "GFLOP/s")
    add("ceiling", "numpy matmul, 1 core", c.get("numpy_single_core"), "GFLOP/s")
    u = results.get("cunet", {})
    label = f"{u.get('input_size')}², z={u.get('z')}, batch {u.get('batch_size')}"
    add("cunet", "forward GFLOP/image (profiler)", _gflop(u.get("flops_forward_profiler")), "GFLOP")
    add("cunet", f"training ({label})", u.get("train_images_per_s"), "img/s")
    add("cunet", f"inference ({label})", u.get("infer_images_per_s"), "img/s")
    add("cunet", "training / ceiling", u.get("train_fraction_of_ceiling"), "fraction", "cunet_train_fraction_of_ceiling")
    add("cunet", "inference / ceiling", u.get("infer_fraction_of_ceiling"), "fraction", "cunet_infer_fraction_of_ceiling")
    ts = results.get("train_step", {}) or {}
    for part in ts.get("parts") or []:
        add("train_step", f"{part['part']}: {part['what']}", f"{part['ms']:.1f} ms ({part['share']:.0%})", "ms/step")
    if ts.get("step_ms"):
        add("train_step", f"one step as train_cunet runs it (op determinism, {ts.get('steps_per_epoch')} steps/epoch)",
            ts["step_ms"], "ms")
    for row in results.get("variations", {}).get("rows") or []:
        add("variations", f"{row['name']}: train / infer", f"{_fmt(row.get('train_images_per_s'))} / "
            f"{_fmt(row.get('infer_images_per_s'))}", "img/s")
    t = results.get("torch", {})
    add("torch", "kts training (interleaved with PyTorch, op determinism)", t.get("kts_train_images_per_s"), "img/s")
    add("torch", "kts inference (interleaved)", t.get("kts_infer_images_per_s"), "img/s")
    add("torch", "PyTorch training", t.get("train_images_per_s"), "img/s")
    add("torch", "PyTorch inference", t.get("infer_images_per_s"), "img/s")
    add("torch", "kts / PyTorch, training", t.get("kts_over_torch_train"), "ratio", "kts_over_torch_train")
    add("torch", "kts / PyTorch, inference", t.get("kts_over_torch_infer"), "ratio", "kts_over_torch_infer")
    for mode, multiplier in (("train", 3), ("infer", 1)):  # what the goal asks of kts, against the FP32 ceiling
        peer = _fraction(t.get(f"{mode}_images_per_s"), u.get("flops_forward_analytic"), multiplier,
                         fp32_ceiling(c))[1]
        if peer is not None:
            name = {"train": "training", "infer": "inference"}[mode]
            wanted = GOALS[f"kts_over_torch_{mode}"][1]
            add("torch", f"PyTorch {name} / ceiling", peer, "fraction")
            add("torch", f"kts {name} / ceiling that {wanted}x PyTorch needs"
                + (" (> 1: not reachable in FP32)" if peer * wanted > 1 else ""), round(peer * wanted, 3), "fraction")
    p = results.get("input_pipeline", {})
    add("input_pipeline", "make_dataset step", p.get("pipeline_s_per_step"), "s/step")
    add("input_pipeline", "tensors step", p.get("tensors_s_per_step"), "s/step")
    add("input_pipeline", "overhead", p.get("overhead_pct"), "%", "input_pipeline_overhead_pct")
    for name in ("quick", "paper"):
        r = (results.get("maskrcnn", {}) or {}).get(name) or {}
        add("maskrcnn", f"{name}: training step", r.get("seconds_per_step"), "s")
        add("maskrcnn", f"{name}: inference", r.get("ms_per_crop"), "ms/crop")
        add("maskrcnn", f"{name}: first step (tracing)", r.get("first_step_s"), "s")
    d = results.get("data", {})
    add("data", "phantom generation", d.get("generate_slices_per_s"), "slices/s")
    add("data", "phantom write (DICOM+PNG)", d.get("write_slices_per_s"), "slices/s")
    add("data", "read_series", d.get("read_series_slices_per_s"), "slices/s")
    add("data", "build_dataset", d.get("build_dataset_slices_per_s"), "slices/s")
    q = results.get("e2e_quick", {})
    add("e2e", "quick profile wall", q.get("wall_min"), "min", "e2e_quick_wall_min")
    # issue 15's memory goal is the largest process's peak (a kernel); the whole tree adds the runner
    add("e2e", "quick profile peak RSS, largest process", q.get("peak_rss_largest_process_si_gb"),
        "GB (1e9 bytes: a Binder's 2G)", "e2e_quick_peak_rss_gb")
    add("e2e", "quick profile peak RSS, process tree", q.get("peak_rss_tree_si_gb"), "GB (1e9 bytes)")
    add("e2e", "quick profile peak RSS, largest process", q.get("peak_rss_largest_process_gb"), "GiB")
    for notebook, seconds in (q.get("wall_s_per_notebook") or {}).items():
        add("e2e", f"quick: {notebook}", seconds, "s")
    for notebook, mib in (q.get("peak_rss_mib_per_notebook") or {}).items():  # which kernel holds the memory
        add("e2e", f"quick: {notebook} kernel peak RSS", round(mib / 1024, 2), "GiB")
    pp = results.get("e2e_paper", {})
    add("e2e", "paper profile wall per seed", pp.get("wall_min_per_seed"), "min", "e2e_paper_wall_min_per_seed")

    head = (f"# kts benchmark{' (--quick: small settings, not the paper’s)' if results.get('quick') else ''}\n\n"
            f"{m.get('cpu_model')}, {m.get('cores')} cores, {m.get('memory_gb')} GB; TF "
            f"{(m.get('versions') or {}).get('tensorflow')}, oneDNN {m.get('onednn_opts')}; {m.get('date')}; "
            f"load average {results.get('load_average_start')} → {results.get('load_average_end')}\n\n")
    earlier = results.get("earlier_sections") or {}
    if earlier.get("sections"):
        other_cpu = earlier.get("cpu_model") and earlier.get("cpu_model") != m.get("cpu_model")
        head += (f"Sections {', '.join(earlier['sections'])} are from an earlier run ({earlier.get('date')}, "
                 f"load average {earlier.get('load_average_start')}); the others from this one."
                 + (f" **That run had another processor ({earlier['cpu_model']}): compare its figures only with "
                    "each other, never with this run's.**" if other_cpu else "") + "\n\n")
    table = markdown_table(rows, ("section", "figure", "median", "unit", "goal", "met"))
    skipped = [f"- {name}: {results[name]['skipped']}" for name in SECTIONS
               if isinstance(results.get(name), dict) and results[name].get("skipped")]
    limits = (results.get("cunet") or {}).get("limits") or []
    out = head + table
    if limits:
        out += "\nWhat limits CU-Net:\n" + "".join(f"- {line}\n" for line in limits)
    if skipped:
        out += "\nSkipped:\n" + "\n".join(skipped) + "\n"
    return out


def _fmt(figure: Any) -> str:
    v = median_of(figure) if isinstance(figure, dict) else figure
    return "—" if v is None else f"{v:.3g}"


def _gflop(flops: int | None) -> float | None:
    return None if flops is None else round(flops / 1e9, 4)


# ----------------------------------------------------------------------------- worker tasks (run in subprocesses)

def _configure_tf(threads: dict | None, determinism: bool):
    import tensorflow as tf

    if threads:
        if threads.get("intra"):
            tf.config.threading.set_intra_op_parallelism_threads(int(threads["intra"]))
        if threads.get("inter"):
            tf.config.threading.set_inter_op_parallelism_threads(int(threads["inter"]))
    if determinism:
        tf.config.experimental.enable_op_determinism()
    return tf


def count_flops_tf(model, input_shape: Sequence[int]) -> dict[str, Any]:
    """Forward FLOPs of one image counted by TensorFlow's profiler on a frozen concrete function
    (``tf.compat.v1.profiler`` float_ops), total and per op type."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2_as_graph

    spec = tf.TensorSpec([1, *input_shape], tf.float32)
    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    _, graph_def = convert_variables_to_constants_v2_as_graph(concrete)
    with tf.Graph().as_default() as graph:
        tf.graph_util.import_graph_def(graph_def, name="")
        options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
        options["output"] = "none"
        prof = tf.compat.v1.profiler.profile(graph=graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op",
                                             options=options)
    by_type = {child.name: int(child.float_ops) for child in prof.children if child.float_ops}
    return {"total": int(prof.total_float_ops), "by_op_type": by_type}


def task_matmul(n: int, warmup: int, repeats: int, libraries: Sequence[str] = ("tensorflow", "numpy")) -> dict:
    """GFLOP/s of an n x n FP32 matrix product (2 n^3 FLOPs)."""
    import numpy as np

    flops = 2.0 * n ** 3
    out = {}
    if "tensorflow" in libraries:
        import tensorflow as tf

        a = tf.random.normal([n, n], seed=1)
        b = tf.random.normal([n, n], seed=2)

        def tf_call():
            c = tf.linalg.matmul(a, b)
            return c.numpy()[0, 0]
        out["tensorflow"] = [flops / t / 1e9 for t in time_repeats(tf_call, warmup, repeats, 0.3)]
    if "numpy" in libraries:
        rng = np.random.default_rng(0)
        a_np = rng.standard_normal((n, n), dtype=np.float32)
        b_np = rng.standard_normal((n, n), dtype=np.float32)
        out["numpy"] = [flops / t / 1e9 for t in time_repeats(lambda: a_np @ b_np, warmup, repeats, 0.3)]
    return out


def _compile(model, jit_compile: bool = False):
    from kts.train import compile_cunet

    compile_cunet(model, 1e-3, jit_compile=True if jit_compile else "auto")


def task_cunet(size: int, z: int, batch: int, warmup: int, repeats: int, modes: Sequence[str] = ("train", "infer"),
               flops: bool = False, layers: bool = False, jit_compile: bool = False,
               dtype_policy: str | None = None, fused_batch_norm: bool = True) -> dict:
    """CU-Net training (``train_on_batch`` with the recipe's loss, optimizer and metrics) and
    inference (``predict_on_batch``) images/s on random tensors; optionally the FLOP count and a
    per-convolution forward timing."""
    import keras
    import numpy as np
    import tensorflow as tf

    from kts.cunet import build_cunet, forward_flops

    keras.utils.set_random_seed(0)
    if dtype_policy:
        keras.mixed_precision.set_dtype_policy(dtype_policy)
    try:
        model = build_cunet(input_shape=(size, size, 1), z=z, fused_batch_norm=fused_batch_norm)
    finally:
        if dtype_policy:
            keras.mixed_precision.set_dtype_policy("float32")
    _compile(model, jit_compile)
    out: dict[str, Any] = {"params": int(model.count_params()), "flops_forward_analytic": forward_flops(model)}
    if flops:
        counted = count_flops_tf(model, (size, size, 1))
        out["flops_forward_profiler"], out["flops_by_op_type"] = counted["total"], counted["by_op_type"]
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((batch, size, size, 1), dtype=np.float32))
    y = tf.constant((rng.random((batch, size, size, 1)) > 0.5).astype(np.float32))
    if "train" in modes:
        t0 = time.perf_counter()
        model.train_on_batch(x, y)
        out["train_first_call_s"] = time.perf_counter() - t0
        out["train_images_per_s"] = [batch / t for t in time_repeats(lambda: model.train_on_batch(x, y),
                                                                     warmup, repeats, 0.5)]
    if "infer" in modes:
        t0 = time.perf_counter()
        model.predict_on_batch(x)
        out["infer_first_call_s"] = time.perf_counter() - t0
        out["infer_images_per_s"] = [batch / t for t in time_repeats(lambda: model.predict_on_batch(x),
                                                                     warmup, repeats, 0.5)]
    if layers:
        out["layers"] = _layer_times(model, batch, warmup, max(3, repeats // 2))
    return out


def _layer_times(model, batch: int, warmup: int, repeats: int) -> list[dict]:
    """Forward time of each convolution alone, at the model's shapes (where the time goes)."""
    import numpy as np
    import tensorflow as tf
    from keras import layers

    from kts.cunet import layer_flops

    rows = []
    probe = tf.constant(np.zeros((batch, 8, 8, 1), np.float32))
    noop = tf.function(lambda t: t * 2.0)  # what one call costs without the work: subtracted
    overhead = statistics.median(time_repeats(lambda: noop(probe).numpy(), warmup, repeats, 0.05))
    for layer in model.layers:
        if not isinstance(layer, (layers.Conv2D, layers.Conv2DTranspose)):
            continue
        in_shape = tuple(layer.input.shape[1:])
        out_shape = tuple(layer.output.shape[1:])
        flops = layer_flops(layer) * batch
        x = tf.constant(np.random.default_rng(0).random((batch, *in_shape), dtype=np.float32))
        fn = tf.function(lambda t, layer=layer: layer(t))
        seconds = statistics.median(time_repeats(lambda: fn(x).numpy(), warmup, repeats, 0.05))
        seconds = max(seconds - overhead, 0.05 * seconds)
        rows.append({"layer": layer.name, "input": list(in_shape), "output": list(out_shape),
                     "gflop": round(flops / 1e9, 5), "ms": round(seconds * 1e3, 3),
                     "gflops_per_s": round(flops / seconds / 1e9, 2)})
    return rows


def task_train_step(size: int, z: int, batch: int, warmup: int, repeats: int, n_train: int) -> dict:
    """Where one CU-Net training step's time goes, as ``train_cunet`` runs it (op determinism on, the
    recipe's loss, Adam and metrics): milliseconds of nested variants of the step, each adding one part,
    plus the per-epoch checkpoint (``last.keras``) spread over the steps of an epoch of ``n_train`` slices."""
    import keras
    import numpy as np
    import tensorflow as tf

    from kts.cunet import build_cunet
    from kts.train import compile_cunet, make_dataset, steps_per_epoch

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((batch, size, size, 1), dtype=np.float32))
    y = tf.constant((rng.random((batch, size, size, 1)) > 0.97).astype(np.float32))

    def ms(fn) -> list[float]:
        return [t * 1e3 for t in time_repeats(fn, warmup, repeats, 0.5)]

    model = build_cunet(input_shape=(size, size, 1), z=z)
    compile_cunet(model, 1e-3)
    loss_fn, optimizer, weights = model.loss, model.optimizer, model.trainable_variables

    @tf.function
    def forward():
        return model(x, training=True)

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return tape.gradient(loss, weights)  # every gradient an output: none pruned from the graph

    @tf.function
    def forward_backward_adam():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, weights), weights))
        return loss

    out = {"forward": ms(lambda: forward().numpy()), "forward_backward": ms(lambda: forward_backward()[0].numpy()),
           "forward_backward_adam": ms(lambda: forward_backward_adam().numpy()),
           "train_on_batch": ms(lambda: model.train_on_batch(x, y))}
    bare = build_cunet(input_shape=(size, size, 1), z=z)
    bare.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.BinaryCrossentropy())
    out["train_on_batch_without_metrics"] = ms(lambda: bare.train_on_batch(x, y))
    # fit over make_dataset (input pipeline, Keras' epoch loop, callbacks, validation), per step
    images = rng.uniform(0, 255, (n_train, size, size)).astype(np.float32)
    masks = rng.random((n_train, size, size)) > 0.97
    per_epoch = steps_per_epoch(n_train, batch)
    validation = (x[:2], y[:2])  # I_beta of TD-70%: two slices, scored after every epoch
    epoch_s: list[float] = []

    class EpochTimes(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_s.append(time.perf_counter() - self.t0)

    # one fit over several epochs, as train_cunet calls it (each new fit call would trace again)
    dataset = make_dataset(images, masks, batch, seed=0, epochs=repeats + 1)
    model.fit(dataset, epochs=repeats + 1, steps_per_epoch=per_epoch, verbose=0, shuffle=False,
              validation_data=validation, validation_batch_size=batch, callbacks=[EpochTimes()])
    fit_ms = [t / per_epoch * 1e3 for t in epoch_s[1:]]  # epoch 0 holds the tracing
    out["fit_per_step"] = fit_ms
    with tempfile.TemporaryDirectory() as tmp:
        out["checkpoint_per_epoch"] = ms(lambda: model.save(Path(tmp) / "last.keras"))
    out["steps_per_epoch"] = per_epoch
    return out


def task_input_pipeline(size: int, z: int, batch: int, n_images: int, steps: int, repeats: int) -> dict:
    """Seconds per training step through ``make_dataset`` (flip augmentation, stateless shuffle)
    vs through pre-materialised batches; the two are alternated so load changes hit both."""
    import keras
    import numpy as np
    import tensorflow as tf

    from kts.cunet import build_cunet
    from kts.train import make_dataset, prepare_inputs, prepare_masks, steps_per_epoch

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (n_images, size, size)).astype(np.float32)
    masks = (rng.random((n_images, size, size)) > 0.5).astype(np.uint8)
    model = build_cunet(input_shape=(size, size, 1), z=z)
    _compile(model)
    per_epoch = steps_per_epoch(n_images, batch)
    pipeline = make_dataset(images, masks, batch, seed=0, epochs=steps // per_epoch + 2)
    x, y = prepare_inputs(images), prepare_masks(masks)
    nb = n_images // batch
    tensors = tf.data.Dataset.from_tensor_slices(
        (x[: nb * batch].reshape(nb, batch, size, size, 1), y[: nb * batch].reshape(nb, batch, size, size, 1))
    ).repeat()
    model.fit(tensors, epochs=1, steps_per_epoch=2, verbose=0)  # trace once
    model.fit(pipeline, epochs=1, steps_per_epoch=2, verbose=0)
    timings = {"pipeline": [], "tensors": []}
    for _ in range(repeats):
        for name, ds in (("pipeline", pipeline), ("tensors", tensors)):
            t0 = time.perf_counter()
            model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0)
            timings[name].append((time.perf_counter() - t0) / steps)
    return timings


def task_maskrcnn(profiles: Sequence[str], steps: int, n_crops: int, warmup: int, repeats: int) -> dict:
    """Mask R-CNN (section III.B): training seconds per step and first-step (tracing) cost from
    ``TumorMaskRCNN.fit``'s timing, inference ms per crop and the first predict call."""
    import numpy as np

    from kts.config import get_profile
    from kts.maskrcnn import TumorMaskRCNN

    out = {}
    for name in profiles:
        config = get_profile(name).maskrcnn
        s = config.crop_size
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[:s, :s]
        crops = rng.uniform(20, 80, (n_crops, s, s)).astype(np.float32)
        labels = np.zeros((n_crops, s, s), np.uint16)
        for i in range(n_crops):
            for j in range(1 + i % 2):
                cy, cx, r = rng.uniform(0.25 * s, 0.75 * s), rng.uniform(0.25 * s, 0.75 * s), rng.uniform(s / 10, s / 6)
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                labels[i][disc] = j + 1
                crops[i][disc] = 200.0
        model = TumorMaskRCNN(config, seed=0)
        model.fit(crops, labels, steps=steps, seed=0, progress=False)
        timing = dict(model.timing)
        t0 = time.perf_counter()
        model.predict(crops[:n_crops])
        first_predict = time.perf_counter() - t0
        per_call = time_repeats(lambda: model.predict(crops), warmup, repeats, 0.2)
        out[name] = {"crop_size": s, "backbone": config.backbone, "batch_size": config.batch_size,
                     "steps": steps, "seconds_per_step": timing["seconds_per_step"],
                     "first_step_s": timing["first_step_s"], "first_predict_s": first_predict,
                     "ms_per_crop": [t / n_crops * 1e3 for t in per_call]}
    return out


def task_data(n_cases: int, repeats: int, workdir: str) -> dict:
    """Slices per second: phantom generation, writing it as DICOM + PNG masks, ``read_series``
    of every case and ``build_dataset`` (extraction, normalisation, resize; no cache)."""
    from kts import data, dicom, phantom

    out: dict[str, list] = {"generate": [], "write": [], "read_series": [], "build_dataset": []}
    n_slices = 0
    for r in range(repeats):
        t0 = time.perf_counter()
        slices = phantom.generate(n_cases=n_cases, seed=r)
        out["generate"].append(len(slices) / (time.perf_counter() - t0))
        n_slices = len(slices)
        root = Path(workdir) / f"phantom-{r}"
        t0 = time.perf_counter()
        phantom.write_dataset(root, n_cases=n_cases, seed=r)
        out["write"].append(n_slices / (time.perf_counter() - t0))
        cases = sorted(p for p in root.iterdir() if p.is_dir() and (p / "dicom").is_dir())
        t0 = time.perf_counter()
        read = sum(len(dicom.read_series(case / "dicom")[1]) for case in cases)
        out["read_series"].append(read / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        ds = data.build_dataset(root, image_size=320)
        out["build_dataset"].append(len(ds) / (time.perf_counter() - t0))
    return {"n_slices": n_slices, "n_cases": n_cases, **out}


def task_torch_cunet(size: int, z: int, batch: int, warmup: int, repeats: int, expected_params: int) -> dict:
    """The PyTorch peer: the same CU-Net, channels-last, Adam + binary cross-entropy."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    model = torch_cunet(z=z)
    params = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var")))
    if params != expected_params:
        raise RuntimeError(f"PyTorch CU-Net has {params} parameters, the Keras model {expected_params}: "
                           "the peer is not the same architecture")
    model = model.to(memory_format=torch.channels_last)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((batch, 1, size, size), dtype=np.float32)).to(memory_format=torch.channels_last)
    y = torch.from_numpy((rng.random((batch, 1, size, size)) > 0.5).astype(np.float32)).to(
        memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCELoss()

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        return float(loss)

    model.train()
    t0 = time.perf_counter()
    train_step()  # oneDNN builds its primitives on the first calls, as TF traces on its first
    first_train = time.perf_counter() - t0
    train = [batch / t for t in time_repeats(train_step, warmup, repeats, 0.5)]
    model.eval()

    def infer():
        with torch.inference_mode():
            return model(x).numpy()
    t0 = time.perf_counter()
    infer()
    first_infer = time.perf_counter() - t0
    infer_rates = [batch / t for t in time_repeats(infer, warmup, repeats, 0.5)]
    return {"params": int(params), "version": torch.__version__, "threads": torch.get_num_threads(),
            "train_images_per_s": train, "infer_images_per_s": infer_rates,
            "train_first_call_s": first_train, "infer_first_call_s": first_infer}


def torch_cunet(z: int = 16, mu: Sequence[int] = (1, 2, 4, 8), channels: int = 1, f_rate: float = 0.1):
    """Algorithm 1 in PyTorch, layer for layer as :func:`kts.cunet.build_cunet` (batch norm with
    Keras' epsilon and momentum, ReLU transposed convolutions, concat order [up, skip])."""
    from torch import cat, nn, sigmoid

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01), nn.ReLU(inplace=True))

    widths = [z * m for m in mu]

    class TorchCUNet(nn.Module):
        def __init__(self):
            super().__init__()
            cins = [channels, *widths[:-1]]
            self.encoder = nn.ModuleList(block(ci, w) for ci, w in zip(cins, widths))
            self.pool, self.dropout = nn.MaxPool2d(2), nn.Dropout(f_rate)
            self.bottleneck = block(widths[-1], 2 * widths[-1])
            ups, decs, cin = [], [], 2 * widths[-1]
            for w in reversed(widths):
                ups.append(nn.ConvTranspose2d(cin, w, 3, stride=2, padding=1, output_padding=1))
                decs.append(block(2 * w, w))
                cin = w
            self.up, self.decoder = nn.ModuleList(ups), nn.ModuleList(decs)
            self.out = nn.Conv2d(widths[0], 1, 1)

        def forward(self, x):
            skips = []
            for enc in self.encoder:
                x = enc(x)
                skips.append(x)
                x = self.dropout(self.pool(x))
            x = self.bottleneck(x)
            for up, dec, skip in zip(self.up, self.decoder, reversed(skips)):
                x = dec(self.dropout(cat([nn.functional.relu(up(x)), skip], 1)))
            return sigmoid(self.out(x))

    return TorchCUNet()


TASKS: dict[str, Callable[..., dict]] = {
    "matmul": task_matmul, "cunet": task_cunet, "input_pipeline": task_input_pipeline,
    "maskrcnn": task_maskrcnn, "data": task_data, "torch_cunet": task_torch_cunet,
    "train_step": task_train_step,
}


def worker_main(spec_path: str, result_path: str) -> int:
    """Run the tasks of a spec file in this (fresh) process; results are written after each task."""
    spec = json.loads(Path(spec_path).read_text())
    results: list[dict] = []
    uses_tf = any(t["name"] not in ("torch_cunet", "data") for t in spec["tasks"])
    if uses_tf:
        _configure_tf(spec.get("threads"), spec.get("determinism", False))
    for task in spec["tasks"]:
        t0 = time.perf_counter()
        try:
            value = TASKS[task["name"]](**task.get("params", {}))
            results.append({"ok": True, "value": value, "seconds": time.perf_counter() - t0})
        except Exception as exc:  # recorded as the section's "skipped" reason
            results.append({"ok": False, "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc()[-2000:]})
        kts_io.write_json(result_path, results)
    return 0


def spawn(tasks: list[dict], env: dict[str, str] | None = None, threads: dict | None = None,
          determinism: bool = False, timeout: float = 1800) -> dict[str, Any]:
    """Run ``tasks`` in a fresh ``python -m kts.bench --worker`` process with ``env`` added."""
    with tempfile.TemporaryDirectory(prefix="kts-bench-") as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        kts_io.write_json(spec, {"tasks": tasks, "threads": threads, "determinism": determinism})
        full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", **(env or {})}
        load_start = load_average()
        t0 = time.perf_counter()
        error = None
        try:
            proc = subprocess.run([sys.executable, "-m", "kts.bench", "--worker", str(spec), str(result)],
                                  env=full_env, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                error = f"worker exited {proc.returncode}: {proc.stderr.strip()[-600:]}"
        except subprocess.TimeoutExpired:
            error = f"worker timed out after {timeout:.0f} s"
        done = json.loads(result.read_text()) if result.exists() else []
    done += [{"ok": False, "error": error or "worker did not run this task"}] * (len(tasks) - len(done))
    return {"results": done, "wall_s": round(time.perf_counter() - t0, 1),
            "load_average": [load_start, load_average()]}


# ----------------------------------------------------------------------------- sections

def _settings(quick: bool) -> dict[str, Any]:
    profile = "quick" if quick else "paper"
    cunet = cunet_settings(profile)
    return {"profile": profile, "warmup": 1 if quick else 2, "repeats": 3 if quick else 5, "matmul_n": 1024 if quick else 4096,
            "cunet_size": cunet["size"], "cunet_z": cunet["z"], "cunet_batch": cunet["batch"],
            "pipeline_images": 8 if quick else 24, "pipeline_steps": 3 if quick else 12,
            "maskrcnn_steps": 4 if quick else 10, "maskrcnn_crops": 4 if quick else 8,
            "data_cases": 2 if quick else 10, "data_repeats": 2 if quick else 3}


def _skipped_template(keys: Sequence[str], reason: str | None) -> dict[str, Any]:
    return {**{k: None for k in keys}, "skipped": reason}


CEILING_KEYS = ("n", "tf_all_core", "tf_single_core", "numpy_all_core", "numpy_single_core", "load_average")
CUNET_KEYS = ("input_size", "z", "batch_size", "paper_settings", "params", "flops_forward_profiler",
              "flops_forward_analytic", "flops_profiler_over_analytic", "flops_by_op_type", "train_images_per_s",
              "infer_images_per_s", "train_first_call_s", "infer_first_call_s", "train_gflops_per_s",
              "infer_gflops_per_s", "train_fraction_of_ceiling", "infer_fraction_of_ceiling", "layers",
              "conv_share_of_inference", "limits", "load_average")
VARIATION_KEYS = ("rows", "best_train", "best_infer", "load_average")
TORCH_KEYS = ("version", "threads", "params", "rounds", "order", "train_images_per_s", "infer_images_per_s",
              "kts_train_images_per_s", "kts_infer_images_per_s", "kts_over_torch_train", "kts_over_torch_infer",
              "load_average")
PIPELINE_KEYS = ("n_images", "batch_size", "steps", "input_size", "pipeline_s_per_step", "tensors_s_per_step",
                 "overhead_pct", "load_average")
MASKRCNN_KEYS = ("quick", "paper", "load_average")
DATA_KEYS = ("n_cases", "n_slices", "generate_slices_per_s", "write_slices_per_s", "read_series_slices_per_s",
             "build_dataset_slices_per_s", "load_average")
TRAIN_STEP_KEYS = ("input_size", "z", "batch_size", "steps_per_epoch", "variants_ms", "step_ms", "parts",
                   "load_average")
E2E_KEYS = ("profile", "command", "returncode", "wall_s", "wall_min", "wall_min_per_seed", "seeds",
            "peak_rss_gb", "peak_rss_largest_process_gb", "peak_rss_largest_process_si_gb", "peak_rss_tree_si_gb",
            "wall_s_per_notebook", "peak_rss_mib_per_notebook",
            "load_average")


def section_ceiling(s: dict) -> dict:
    out = _skipped_template(CEILING_KEYS, None)
    out["n"] = s["matmul_n"]
    task = {"name": "matmul", "params": {"n": s["matmul_n"], "warmup": s["warmup"], "repeats": s["repeats"]}}
    single = spawn([task], env=SINGLE_CORE_ENV, threads={"intra": 1, "inter": 1})
    every = spawn([task])
    out["load_average"] = {"single_core": single["load_average"], "all_core": every["load_average"]}
    for label, run in (("single_core", single), ("all_core", every)):
        r = run["results"][0]
        if not r.get("ok"):
            out["skipped"] = f"{label}: {r['error']}"
            continue
        out[f"tf_{label}"] = median_of_repeats(r["value"]["tensorflow"], "GFLOP/s")
        out[f"numpy_{label}"] = median_of_repeats(r["value"]["numpy"], "GFLOP/s")
    return out


def fp32_ceiling(ceiling: dict) -> float | None:
    """The machine's FP32 ceiling: the faster all-core matrix product, TensorFlow's or numpy's (on some CPUs
    TensorFlow's own matmul uses one core and reads below what its convolutions reach)."""
    rates = [median_of(ceiling.get(key)) for key in ("tf_all_core", "numpy_all_core")]
    rates = [r for r in rates if r]
    return max(rates) if rates else None


def _cunet_task(s: dict, batch: int | None = None, **extra) -> dict:
    return {"name": "cunet", "params": {"size": s["cunet_size"], "z": s["cunet_z"], "batch": batch or s["cunet_batch"],
                                       "warmup": s["warmup"], "repeats": s["repeats"], **extra}}


def _fraction(rate_figure: dict | None, flops: int | None, multiplier: float, ceiling: float | None):
    if rate_figure is None or flops is None:
        return None, None
    gflops = rate_figure["median"] * flops * multiplier / 1e9
    return round(gflops, 2), (round(gflops / ceiling, 4) if ceiling else None)


def _spawn_one(out: dict, tasks: list) -> dict | None:
    """Run one worker task; record the load average; on failure mark ``out`` skipped and return None."""
    run = spawn(tasks)
    out["load_average"] = run["load_average"]
    result = run["results"][0]
    if not result.get("ok"):
        out["skipped"] = result["error"]
        return None
    return result["value"]


def section_cunet(s: dict, ceiling: float | None) -> dict:
    out = _skipped_template(CUNET_KEYS, None)
    out.update(input_size=s["cunet_size"], z=s["cunet_z"], batch_size=s["cunet_batch"],
               paper_settings=(s["cunet_size"], s["cunet_z"], s["cunet_batch"]) == tuple(cunet_settings("paper").values()))
    v = _spawn_one(out, [_cunet_task(s, flops=True, layers=True)])
    if v is None:
        return out
    for key in ("params", "flops_forward_profiler", "flops_forward_analytic", "flops_by_op_type", "layers",
                "train_first_call_s", "infer_first_call_s"):
        out[key] = v.get(key)
    out["flops_profiler_over_analytic"] = round(v["flops_forward_profiler"] / v["flops_forward_analytic"], 5)
    out["train_images_per_s"] = median_of_repeats(v["train_images_per_s"], "images/s")
    out["infer_images_per_s"] = median_of_repeats(v["infer_images_per_s"], "images/s")
    flops = v["flops_forward_analytic"]
    out["train_gflops_per_s"], out["train_fraction_of_ceiling"] = _fraction(out["train_images_per_s"], flops, 3, ceiling)
    out["infer_gflops_per_s"], out["infer_fraction_of_ceiling"] = _fraction(out["infer_images_per_s"], flops, 1, ceiling)
    out["limits"], out["conv_share_of_inference"] = _limits(out, ceiling)
    return out


STEP_PARTS = (
    # name, what it adds, measured as (variant, minus variant)
    ("forward", "the forward pass (training=True: batch norm on batch statistics, dropout)", "forward", None),
    ("backward", "the gradients", "forward_backward", "forward"),
    ("adam", "the Adam update", "forward_backward_adam", "forward_backward"),
    ("keras_step", "Keras' train step around it (loss tracking, dispatch)", "train_on_batch_without_metrics",
     "forward_backward_adam"),
    ("metrics", "the recipe's accuracy and IoU metrics", "train_on_batch", "train_on_batch_without_metrics"),
    ("input_and_loop", "the input pipeline (make_dataset), Keras' epoch loop, callbacks and validation",
     "fit_per_step", "train_on_batch"),
)


def section_train_step(s: dict) -> dict:
    """One CU-Net training step as ``train_cunet`` runs it, taken apart (issue 15): ms per part.

    An epoch holds the training slices of notebook 02's partition (TD-70%/VD-6%) of the profile's cases."""
    from kts import config, data

    out = _skipped_template(TRAIN_STEP_KEYS, None)
    n_train = data.split_sizes(config.get_profile(s["profile"]).n_cases, *data.PARTITIONS["TD-70% VD-6%"])[0]
    out.update(input_size=s["cunet_size"], z=s["cunet_z"], batch_size=s["cunet_batch"])
    run = spawn([{"name": "train_step", "params": {"size": s["cunet_size"], "z": s["cunet_z"], "batch": s["cunet_batch"],
                                                   "warmup": s["warmup"], "repeats": s["repeats"],
                                                   "n_train": n_train}}], determinism=True)
    out["load_average"] = run["load_average"]
    result = run["results"][0]
    if not result.get("ok"):
        out["skipped"] = result["error"]
        return out
    v = result["value"]
    out["steps_per_epoch"] = v["steps_per_epoch"]
    med = {k: statistics.median(v[k]) for k in v if isinstance(v[k], list)}
    out["variants_ms"] = {k: round(x, 2) for k, x in med.items()}
    parts = [(name, what, med[a] - (med[b] if b else 0.0)) for name, what, a, b in STEP_PARTS]
    parts.append(("checkpoint", "saving last.keras once per epoch, spread over its steps",
                  med["checkpoint_per_epoch"] / v["steps_per_epoch"]))
    total = med["fit_per_step"] + med["checkpoint_per_epoch"] / v["steps_per_epoch"]
    out["step_ms"] = round(total, 2)
    out["parts"] = [{"part": name, "what": what, "ms": round(ms, 2), "share": round(ms / total, 4)}
                    for name, what, ms in parts]
    return out


def _limits(cunet: dict, ceiling: float | None) -> tuple[list[str], float | None]:
    """Plain sentences on where CU-Net's time goes, from the per-convolution timings."""
    layers, rate = cunet.get("layers") or [], median_of(cunet.get("infer_images_per_s"))
    if not layers or not rate:
        return [], None
    batch = cunet["batch_size"]
    forward_ms = batch / rate * 1e3
    conv_ms = sum(r["ms"] for r in layers)
    conv_gflop = sum(r["gflop"] for r in layers)
    share = min(conv_ms / forward_ms, 1.0)
    lines = [] if conv_ms < forward_ms else [
        "the per-convolution times add up to more than the whole forward pass (per-call overhead at small sizes, "
        "or the machine's load changed between measurements): read the shares below with care."]
    lines += [f"convolutions alone take {conv_ms:.0f} ms of a {forward_ms:.0f} ms batch-{batch} forward pass "
             f"({share:.0%}) at {conv_gflop / conv_ms * 1e3:.0f} GFLOP/s; the rest ({1 - share:.0%}) is batch norm, "
             "ReLU, max-pool, concatenation, dropout and Keras dispatch: memory-bound work with ~0 FLOPs."]
    worst = sorted(layers, key=lambda r: r["gflops_per_s"])[:3]
    lines.append("least efficient convolutions: " + ", ".join(
        f"{r['layer']} ({r['input'][-1]}->{r['output'][-1]} channels at {r['output'][0]}x{r['output'][1]}: "
        f"{r['gflops_per_s']:.0f} GFLOP/s, {r['ms']:.1f} ms)" for r in worst)
        + "; few channels at full resolution give low arithmetic intensity (memory-bound).")
    if ceiling:
        best = max(layers, key=lambda r: r["gflops_per_s"])
        ratio = best["gflops_per_s"] / ceiling
        lines.append(f"the best convolution ({best['layer']}) reaches {ratio:.0%} of the {ceiling:.0f} GFLOP/s matmul "
                     "ceiling" + (": even the best-shaped convolution stays below GEMM peak." if ratio < 1 else
                                  ", above it: the load changed between the two measurements."))
    lines.append("training adds the backward pass (batch-norm and ReLU gradients are memory-bound too), the Adam "
                 "update and the recipe's accuracy and IoU metrics every step; FLOPs are taken as 3x forward.")
    return lines, round(share, 4)


VARIATIONS = (
    # name, env, threads, determinism, extra task params
    ("batch 2", {}, None, False, {"batch": 2}),
    ("batch 8", {}, None, False, {"batch": 8}),
    ("XLA (jit_compile)", {}, None, False, {"jit_compile": True}),
    ("mixed bf16", {}, None, False, {"dtype_policy": "mixed_bfloat16"}),
    ("oneDNN off", {"TF_ENABLE_ONEDNN_OPTS": "0"}, None, False, {}),
    ("op determinism (as train_cunet)", {}, None, True, {}),
    # the CU-Net's batch norm before 2026-12-07 (and Keras 3's on TF): moments and normalisation as separate ops
    ("Keras batch norm (unfused), op determinism", {}, None, True, {"fused_batch_norm": False}),
)


def section_variations(s: dict, ceiling: float | None, flops: int | None, baseline: dict | None) -> dict:
    out = _skipped_template(VARIATION_KEYS, None)
    cores = os.cpu_count() or 1
    thread_sets = sorted({(1, 1), (cores, 1), (cores, cores), (max(cores // 2, 1), 2)})
    variants = [(f"intra {a} / inter {b}", {"TF_NUM_INTRAOP_THREADS": str(a), "TF_NUM_INTEROP_THREADS": str(b)},
                 {"intra": a, "inter": b}, False, {}) for a, b in thread_sets] + list(VARIATIONS)
    rows, loads = [], []
    if baseline and baseline.get("train_images_per_s"):
        rows.append({"name": f"baseline (batch {s['cunet_batch']}, default threads, oneDNN on)", "env": {},
                     "batch": s["cunet_batch"], "train_images_per_s": baseline["train_images_per_s"],
                     "infer_images_per_s": baseline["infer_images_per_s"],
                     "train_fraction_of_ceiling": baseline["train_fraction_of_ceiling"],
                     "infer_fraction_of_ceiling": baseline["infer_fraction_of_ceiling"], "error": None})
    for name, env, threads, determinism, extra in variants:
        batch = extra.get("batch", s["cunet_batch"])
        run = spawn([_cunet_task(s, **extra)], env=env, threads=threads, determinism=determinism)
        loads.append(run["load_average"])
        r = run["results"][0]
        row = {"name": name, "env": env, "batch": batch, "train_images_per_s": None, "infer_images_per_s": None,
               "train_fraction_of_ceiling": None, "infer_fraction_of_ceiling": None, "error": None}
        if r.get("ok"):
            row["train_images_per_s"] = median_of_repeats(r["value"]["train_images_per_s"], "images/s")
            row["infer_images_per_s"] = median_of_repeats(r["value"]["infer_images_per_s"], "images/s")
            row["train_fraction_of_ceiling"] = _fraction(row["train_images_per_s"], flops, 3, ceiling)[1]
            row["infer_fraction_of_ceiling"] = _fraction(row["infer_images_per_s"], flops, 1, ceiling)[1]
        else:
            row["error"] = r["error"]
        rows.append(row)
    out["rows"], out["load_average"] = rows, loads
    ok = [r for r in rows if r["train_images_per_s"]]
    if ok:
        out["best_train"] = max(ok, key=lambda r: r["train_images_per_s"]["median"])["name"]
        out["best_infer"] = max(ok, key=lambda r: r["infer_images_per_s"]["median"])["name"]
    return out


def section_torch(s: dict, rounds: int = 3) -> dict:
    """kts against the same CU-Net in PyTorch, interleaved (kts, torch, kts, torch, ...), each run a fresh
    process with the same network, batch, input size and threads; kts as ``train_cunet`` runs it (op
    determinism on). The figure is the ratio of the medians over all repeats of all rounds."""
    out = _skipped_template(TORCH_KEYS, None)
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        out["skipped"] = "torch is not installed (optional: pip install 'kts[bench]')"
        return out
    expected = cunet_param_count(z=s["cunet_z"])
    torch_task = {"name": "torch_cunet", "params": {"size": s["cunet_size"], "z": s["cunet_z"], "batch": s["cunet_batch"],
                                                    "warmup": s["warmup"], "repeats": s["repeats"],
                                                    "expected_params": expected}}
    rates: dict[str, dict[str, list[float]]] = {"kts": {"train": [], "infer": []}, "torch": {"train": [], "infer": []}}
    loads, order = [], []
    for _ in range(rounds):
        for who, task, determinism in (("kts", _cunet_task(s), True), ("torch", torch_task, False)):
            run = spawn([task], determinism=determinism)
            loads.append(run["load_average"])
            order.append(who)
            result = run["results"][0]
            if not result.get("ok"):
                out["skipped"] = f"{who}: {result['error']}"
                return out
            for mode in ("train", "infer"):
                rates[who][mode] += result["value"][f"{mode}_images_per_s"]
            if who == "torch":
                out.update(version=result["value"]["version"], threads=result["value"]["threads"],
                           params=result["value"]["params"])
    out["load_average"], out["order"], out["rounds"] = loads, order, rounds
    for mode in ("train", "infer"):
        out[f"{mode}_images_per_s"] = median_of_repeats(rates["torch"][mode], "images/s")
        out[f"kts_{mode}_images_per_s"] = median_of_repeats(rates["kts"][mode], "images/s")
        out[f"kts_over_torch_{mode}"] = round(out[f"kts_{mode}_images_per_s"]["median"]
                                              / out[f"{mode}_images_per_s"]["median"], 4)
    return out


def section_input_pipeline(s: dict) -> dict:
    out = _skipped_template(PIPELINE_KEYS, None)
    out.update(n_images=s["pipeline_images"], batch_size=s["cunet_batch"], steps=s["pipeline_steps"],
               input_size=s["cunet_size"])
    v = _spawn_one(out, [{"name": "input_pipeline", "params": {
        "size": s["cunet_size"], "z": s["cunet_z"], "batch": s["cunet_batch"], "n_images": s["pipeline_images"],
        "steps": s["pipeline_steps"], "repeats": s["repeats"]}}])
    if v is None:
        return out
    out["pipeline_s_per_step"] = median_of_repeats(v["pipeline"], "s/step")
    out["tensors_s_per_step"] = median_of_repeats(v["tensors"], "s/step")
    paired = [a / b - 1 for a, b in zip(v["pipeline"], v["tensors"])]
    out["overhead_pct"] = round(statistics.median(paired) * 100, 2)  # median of the alternated pairs
    return out


def section_maskrcnn(s: dict) -> dict:
    out = _skipped_template(MASKRCNN_KEYS, None)
    tasks = [{"name": "maskrcnn", "params": {"profiles": [name], "steps": s["maskrcnn_steps"],
                                             "n_crops": s["maskrcnn_crops"], "warmup": 1,
                                             "repeats": s["repeats"]}} for name in ("quick", "paper")]
    loads, errors = [], []
    for task in tasks:  # one process each: fit() turns on op determinism for the whole process
        run = spawn([task])
        loads.append(run["load_average"])
        r = run["results"][0]
        name = task["params"]["profiles"][0]
        if not r.get("ok"):
            errors.append(f"{name}: {r['error']}")
            continue
        v = dict(r["value"][name])
        v["ms_per_crop"] = median_of_repeats(v["ms_per_crop"], "ms/crop")
        for key in ("seconds_per_step", "first_step_s", "first_predict_s"):
            v[key] = round(v[key], 4)
        v["note"] = "seconds_per_step: mean over the steps after the first (TumorMaskRCNN.timing)"
        out[name] = v
    out["load_average"] = loads
    out["skipped"] = "; ".join(errors) or None
    return out


def section_data(s: dict) -> dict:
    out = _skipped_template(DATA_KEYS, None)
    with tempfile.TemporaryDirectory(prefix="kts-bench-data-") as tmp:
        v = _spawn_one(out, [{"name": "data", "params": {"n_cases": s["data_cases"], "repeats": s["data_repeats"],
                                                 "workdir": tmp}}])
    if v is None:
        return out
    out.update(n_cases=v["n_cases"], n_slices=v["n_slices"])
    for key in ("generate", "write", "read_series", "build_dataset"):
        out[f"{key}_slices_per_s"] = median_of_repeats(v[key], "slices/s")
    return out


def _tree_rss_kib(root_pid: int) -> int:
    """Resident memory (KiB) of a process and all its descendants, from /proc."""
    from kts.pipeline import descendant_memory

    return sum(rss for rss, _ in descendant_memory(root_pid).values())


def run_measured(command: Sequence[str], timeout: float, env: dict | None = None) -> dict[str, Any]:
    """Run ``command``; wall time, peak RSS of the process tree (sampled every 0.5 s) and of its
    largest single process (``wait4`` rusage, read from the OS)."""
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a chatty child never blocks
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(command), env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                                stderr=err)
        peak_tree, status, usage, timed_out = 0, None, None, False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak_tree = max(peak_tree, _tree_rss_kib(proc.pid))
            if time.perf_counter() - t0 > timeout:
                timed_out = True
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode(errors="replace")[-1500:]
    return {"returncode": proc.returncode, "wall_s": round(wall, 1),
            "peak_tree_rss_kib": peak_tree, "peak_largest_process_rss_kib": int(usage.ru_maxrss),
            "timed_out": timed_out, "stderr_tail": stderr}


def section_e2e(profile: str, timeout: float) -> dict:
    out = _skipped_template(E2E_KEYS, None)
    out["profile"] = profile
    from kts import config

    with tempfile.TemporaryDirectory(prefix=f"kts-bench-e2e-{profile}-") as tmp:
        folders = {name: str(Path(tmp) / name) for name in ("results", "runs", "work", "data")}
        command = [sys.executable, "-m", "kts", "run", "--profile", profile, "--force",
                   *[arg for name, path in folders.items() for arg in (f"--{name}", path)]]
        load_start = load_average()
        measured = run_measured(command, timeout)
        record = Path(folders["results"]) / "metrics.json"  # where the minutes went, notebook by notebook
        if record.is_file():
            provenance = json.loads(record.read_text())["provenance"]
            out["wall_s_per_notebook"] = provenance.get("wall_s_per_notebook")
            out["peak_rss_mib_per_notebook"] = provenance.get("peak_rss_mib_per_notebook")
    out["load_average"] = [load_start, load_average()]
    out["command"] = " ".join(["python", "-m", "kts", "run", "--profile", profile, "--force",
                               "--results/--runs/--work/--data", "<tmp>"])
    out["returncode"] = measured["returncode"]
    if measured["returncode"] != 0:
        out["skipped"] = (f"timed out after {timeout:.0f} s" if measured["timed_out"] else
                          f"kts run exited {measured['returncode']}: {measured['stderr_tail'][-500:]}")
        return out
    seeds = config.get_profile(profile).seeds
    out.update(wall_s=measured["wall_s"], wall_min=round(measured["wall_s"] / 60, 2), seeds=seeds,
               wall_min_per_seed=round(measured["wall_s"] / 60 / seeds, 2),
               peak_rss_gb=round(measured["peak_tree_rss_kib"] / 1024 ** 2, 3),
               peak_rss_largest_process_gb=round(measured["peak_largest_process_rss_kib"] / 1024 ** 2, 3),
               # issue 15's "2 GB" is a free Binder's limit, "2G" in Kubernetes' units: 2e9 bytes, not 2 GiB
               peak_rss_largest_process_si_gb=round(measured["peak_largest_process_rss_kib"] * 1024 / 1e9, 3),
               peak_rss_tree_si_gb=round(measured["peak_tree_rss_kib"] * 1024 / 1e9, 3))
    return out


# ----------------------------------------------------------------------------- driver

def run_benchmark(sections: Sequence[str] | None = None, quick: bool = False,
                  progress: Callable[[str], None] | None = print,
                  checkpoint: Callable[[dict], Any] | None = None,
                  previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the chosen sections; every section is present in the result (``skipped`` when not run).
    ``checkpoint(results)`` is called after each section (``main`` writes the JSON so far).
    ``previous`` (an earlier result of the same settings) supplies the sections not run now;
    ``results["earlier_sections"]`` names them and the date of that run."""
    chosen = list(sections) if sections is not None else list(QUICK_SECTIONS if quick else DEFAULT_SECTIONS)
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown sections {unknown}: choose from {list(SECTIONS)}")
    say = progress or (lambda _msg: None)
    s = _settings(quick)
    results: dict[str, Any] = {"schema": SCHEMA_VERSION, "quick": quick, "sections_run": chosen, "settings": s,
                               "machine": machine_info(), "load_average_start": load_average()}

    def not_run(name: str) -> str:
        if name == "e2e_paper":
            return "takes hours: run with --sections e2e_paper"
        return f"not run in --quick mode: ask with --sections {name}" if quick else "not among --sections"

    keys = {"ceiling": CEILING_KEYS, "cunet": CUNET_KEYS, "train_step": TRAIN_STEP_KEYS, "variations": VARIATION_KEYS,
            "torch": TORCH_KEYS,
            "input_pipeline": PIPELINE_KEYS, "maskrcnn": MASKRCNN_KEYS, "data": DATA_KEYS, "e2e_quick": E2E_KEYS,
            "e2e_paper": E2E_KEYS}
    for name in SECTIONS:
        results[name] = _skipped_template(keys[name], not_run(name))
    if previous is not None:
        if previous.get("quick") != quick or previous.get("schema") != SCHEMA_VERSION:
            raise ValueError("--merge needs an earlier result of the same schema and the same --quick setting")
        kept = [n for n in SECTIONS if n not in chosen and isinstance(previous.get(n), dict)
                and not previous[n].get("skipped")]
        for name in kept:
            results[name] = previous[name]
        results["earlier_sections"] = {"sections": kept, "date": previous.get("machine", {}).get("date"),
                                       "cpu_model": previous.get("machine", {}).get("cpu_model"),
                                       "load_average_start": previous.get("load_average_start")}
    started = time.perf_counter()

    def timed(name: str, fn: Callable[[], dict]) -> None:
        if name not in chosen:
            return
        say(f"[bench] {name} ... (load average {load_average()})")
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as exc:  # a broken section never loses the others
            results[name] = _skipped_template(keys[name], f"{type(exc).__name__}: {exc}")
        results[name]["section_wall_s"] = round(time.perf_counter() - t0, 1)
        say(f"[bench] {name}: {results[name]['section_wall_s']} s"
            + (f" (skipped: {results[name]['skipped']})" if results[name].get("skipped") else ""))
        if checkpoint is not None:
            checkpoint({**results, "complete": False})

    timed("ceiling", lambda: section_ceiling(s))
    ceiling = fp32_ceiling(results["ceiling"])
    timed("cunet", lambda: section_cunet(s, ceiling))
    timed("train_step", lambda: section_train_step(s))
    flops = results["cunet"].get("flops_forward_analytic")
    if flops is None and "variations" in chosen:  # variations alone: count analytically
        from kts.cunet import build_cunet, forward_flops
        flops = forward_flops(build_cunet(input_shape=(s["cunet_size"], s["cunet_size"], 1), z=s["cunet_z"]))
    timed("variations", lambda: section_variations(s, ceiling, flops, results["cunet"]))
    v = results["variations"]
    if v.get("best_train") and results["cunet"].get("limits"):
        results["cunet"]["limits"].append(f"of the variations tried, the fastest for training was {v['best_train']!r} "
                                          f"and for inference {v['best_infer']!r} (see variations.rows).")
    timed("torch", lambda: section_torch(s, rounds=2 if quick else 3))
    timed("input_pipeline", lambda: section_input_pipeline(s))
    timed("maskrcnn", lambda: section_maskrcnn(s))
    timed("data", lambda: section_data(s))
    timed("e2e_quick", lambda: section_e2e("quick", timeout=3600))
    timed("e2e_paper", lambda: section_e2e("paper", timeout=6 * 3600))

    note = {"settings": "quick" if quick else "paper"}
    c, t, p = results["cunet"], results["torch"], results["input_pipeline"]
    results["goals"] = {
        "cunet_train_fraction_of_ceiling": goal("cunet_train_fraction_of_ceiling", c.get("train_fraction_of_ceiling"), **note),
        "cunet_infer_fraction_of_ceiling": goal("cunet_infer_fraction_of_ceiling", c.get("infer_fraction_of_ceiling"), **note),
        "kts_over_torch_train": goal("kts_over_torch_train", t.get("kts_over_torch_train"), **note),
        "kts_over_torch_infer": goal("kts_over_torch_infer", t.get("kts_over_torch_infer"), **note),
        "input_pipeline_overhead_pct": goal("input_pipeline_overhead_pct", p.get("overhead_pct"), **note),
        "e2e_quick_wall_min": goal("e2e_quick_wall_min", results["e2e_quick"].get("wall_min")),
        "e2e_quick_peak_rss_gb": goal("e2e_quick_peak_rss_gb",
                                      results["e2e_quick"].get("peak_rss_largest_process_si_gb")),
        "e2e_paper_wall_min_per_seed": goal("e2e_paper_wall_min_per_seed", results["e2e_paper"].get("wall_min_per_seed")),
    }
    results["load_average_end"] = load_average()
    results["wall_s"] = round(time.perf_counter() - started, 1)
    results["complete"] = True
    return results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        if len(argv) != 3:
            raise SystemExit("usage: python -m kts.bench --worker SPEC.json RESULT.json")
        return worker_main(argv[1], argv[2])
    parser = argparse.ArgumentParser(prog="python -m kts.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small settings (1024 matmul, CU-Net 128x128 z=8, 3 repeats), under 2 minutes; "
                             f"sections {', '.join(QUICK_SECTIONS)} unless --sections says otherwise")
    parser.add_argument("--out", default=None, help="JSON output (default results/bench.json); "
                                                    "the markdown table goes beside it (.md)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the sections of the existing output that this run does not measure")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=None,
                        help=f"sections to run (default: all but e2e_paper; with --quick: {' '.join(QUICK_SECTIONS)})")
    args = parser.parse_args(argv)
    from kts import config

    out = Path(args.out) if args.out else config.project_root() / "results" / "bench.json"
    previous = json.loads(out.read_text()) if args.merge and out.exists() else None
    results = run_benchmark(args.sections, quick=args.quick, previous=previous,
                            checkpoint=lambda partial: kts_io.write_json(out, partial))
    kts_io.write_json(out, results)
    text = render_markdown(results)
    kts_io.write_text(out.with_suffix(".md"), text)
    print(text)
    print(f"[bench] wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
