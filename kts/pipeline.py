"""``kts run``: every notebook in order, headlessly with papermill, then ``results/metrics.json``.

Each notebook is executed with ``PROFILE`` and ``SEED`` injected into its ``parameters``
cell; executed copies go to ``runs/<profile>/``. A notebook whose executed copy is up to
date (same notebook, same kts sources, same parameters, and every earlier notebook up to
date) is not run again, so an interrupted run restarts at the first notebook whose outputs
are missing or stale. A failing notebook stops the run with a non-zero exit naming the
notebook and the cell.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from kts import config
from kts import io as kts_io

STAMP_SUFFIX = ".stamp.json"
# what every kernel of ``kts run`` gets besides the folders: TF's C++ info lines off, a headless
# matplotlib (kts.plots shows its figures through IPython's PNG formatter, not a backend)
KERNEL_ENV = {**config.NOISE_ENV, "MPLBACKEND": "Agg"}


def descendant_memory(root_pid: int) -> dict[int, tuple[int, int]]:
    """``{pid: (VmRSS, VmHWM)}`` in KiB of a process and all its descendants, from ``/proc`` (Linux; empty
    elsewhere). VmHWM is the process's peak resident memory so far, kept by the kernel."""
    children: dict[int, list[int]] = {}
    memory: dict[int, tuple[int, int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            status = (entry / "status").read_text()
        except (OSError, IndexError, ValueError):  # the process ended while we looked
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if line.startswith(("VmRSS:", "VmHWM:")))
        children.setdefault(ppid, []).append(int(entry.name))
        memory[int(entry.name)] = tuple(int(fields.get(k, "0 kB").split()[0]) for k in ("VmRSS", "VmHWM"))
    found, stack = {}, [root_pid]
    while stack:
        pid = stack.pop()
        if pid in memory:
            found[pid] = memory[pid]
        stack.extend(children.get(pid, []))
    return found


class PeakMemory:
    """The largest peak resident memory (VmHWM, KiB) of any process started under this one while the
    ``with`` block runs, sampled every ``interval`` seconds: a notebook's kernel (issue 15's memory goal)."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak_kib = interval, 0

    def _sample(self) -> None:
        me = os.getpid()
        for pid, (_, hwm) in descendant_memory(me).items():
            if pid != me:
                self.peak_kib = max(self.peak_kib, hwm)

    def __enter__(self) -> "PeakMemory":
        import threading

        self._stop = threading.Event()

        def watch():
            while not self._stop.wait(self.interval):
                self._sample()

        self._thread = threading.Thread(target=watch, name="kts-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return round(self.peak_kib / 1024, 1)


HANG_RETRIES = 1  # a notebook whose cell hangs (run(cell_timeout=...)) runs this many more times before kts run fails


class NotebookFailed(RuntimeError):
    """A notebook raised: the message names the notebook, the cell and the error."""


def _kernel_config():
    """Kernel-manager settings: CurveZMQ-encrypted kernel sockets where jupyter_client, pyzmq and the
    kernelspec support them. Then ipykernel does not print its "Kernel is running over TCP without
    encryption" warning on the console, for each notebook, because its cause is gone."""
    from jupyter_client.manager import KernelManager
    from traitlets.config import Config

    try:
        import zmq

        curve = bool(zmq.has("curve"))
    except ImportError:  # pragma: no cover - jupyter_client needs pyzmq
        curve = False
    if curve and "transport_encryption" in KernelManager.class_trait_names():
        return Config({"KernelManager": {"transport_encryption": "auto"}})
    return Config()


def execute_notebook(notebook: str | os.PathLike, output: str | os.PathLike, parameters: dict[str, Any] | None = None,
                     cwd: str | os.PathLike | None = None, cell_timeout: float | None = None) -> None:
    """Execute one notebook with papermill as ``kts run`` does (kernel ``python3``, no progress bar).

    The environment is the caller's: ``run`` sets ``KERNEL_ENV`` and the folders around it.
    ``cell_timeout``: seconds a cell may go without its kernel's reply (nbclient's ``CellTimeoutError``).
    """
    import papermill as pm

    notebook = Path(notebook)
    pm.execute_notebook(str(notebook), str(output), parameters=parameters or {}, cwd=str(cwd or notebook.parent),
                        kernel_name="python3", progress_bar=False, log_output=False, config=_kernel_config(),
                        execution_timeout=cell_timeout)


def notebooks_dir() -> Path:
    return config.project_root() / "notebooks"


def list_notebooks(folder: Path | None = None) -> list[Path]:
    """The numbered notebooks ``NN_name.ipynb`` in reading order."""
    folder = folder or notebooks_dir()
    found = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"{folder}: no numbered notebooks (NN_name.ipynb) found")
    return found


def _sources_digest() -> str:
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted(package.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def record_metrics(name: str, values: dict[str, Any], results: str | os.PathLike | None = None,
                   profile: str | None = None) -> Path:
    """Called by a notebook: write its figures of merit to ``<results>/metrics/<name>.json``.

    ``kts run`` gathers these into ``results/metrics.json``; tests assert on them, not on text.
    """
    folder = Path(results) if results is not None else config.results_dir(profile)
    return kts_io.write_json(folder / "metrics" / f"{name}.json", values)


def run(profile: str = "paper", seed: int = 0, results: str | os.PathLike | None = None,
        runs: str | os.PathLike | None = None, work: str | os.PathLike | None = None,
        data: str | os.PathLike | None = None, only: list[str] | None = None, force: bool = False,
        parameters: dict[str, Any] | None = None, notebooks: str | os.PathLike | None = None,
        cell_timeout: float | None = None) -> dict[str, Any]:
    """Execute the notebooks with papermill; return (and write) the run's ``metrics.json``.

    ``notebooks``: the folder of numbered notebooks (default the checkout's ``notebooks/``).
    With ``only``, the notebooks not run keep their wall times from the previous ``metrics.json``.
    A cell without its kernel's reply for ``cell_timeout`` seconds (default the profile's
    ``cell_timeout_s``) is taken as hung: its notebook runs once more in a fresh kernel, and a second
    hang fails the run (:class:`NotebookFailed`) instead of waiting for ever.
    """
    import papermill as pm
    from nbclient.exceptions import CellTimeoutError

    settings = config.get_profile(profile)
    cell_timeout = settings.cell_timeout_s if cell_timeout is None else cell_timeout
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    root = config.project_root()
    results = Path(results) if results is not None else config.results_dir(profile)
    runs = Path(runs) if runs is not None else root / "runs" / profile
    work = Path(work) if work is not None else config.work_dir(profile)
    data = Path(data) if data is not None else config.data_dir()
    for folder in (results, runs, work, data):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(f"{folder}: cannot create output folder ({exc.strerror or exc})") from exc
    env = {config.PROFILE_ENV: profile, config.RESULTS_ENV: str(results.resolve()),
           config.WORK_ENV: str(work.resolve()), config.DATA_ENV: str(data.resolve()), **KERNEL_ENV}
    params = {"PROFILE": profile, "SEED": seed, **(parameters or {})}
    notebooks = list_notebooks(Path(notebooks) if notebooks is not None else None)
    every_name = [nb.stem for nb in notebooks]
    if only:
        notebooks = [nb for nb in notebooks if any(nb.name.startswith(o) for o in only)]
    declared = {nb.name: set(pm.inspect_notebook(str(nb))) for nb in notebooks}
    unknown = sorted(set(params) - set().union(*declared.values()))
    if unknown:
        raise ValueError(f"parameter(s) {', '.join(unknown)} are declared by none of "
                         f"{', '.join(declared)}: check the spelling against their parameters cells")
    sources = _sources_digest()
    timings: dict[str, float] = {}
    peaks: dict[str, float] = {}  # peak RSS (MiB) of each notebook's kernel
    upstream = ""
    started = time.perf_counter()
    # the kernels inherit these; restored in `finally` whatever happens, so a failed or refused run
    # never leaves a caller (the test session, a notebook) pointed at its folders
    saved_env = {k: os.environ.get(k) for k in env}
    try:
        os.environ.update(env)
        for i, notebook in enumerate(notebooks, start=1):
            output = runs / notebook.name
            stamp_path = runs / (notebook.stem + STAMP_SUFFIX)
            stamp = hashlib.sha256(json.dumps({"notebook": hashlib.sha256(notebook.read_bytes()).hexdigest(),
                                               "sources": sources, "parameters": params, "upstream": upstream,
                                               "results": str(results.resolve())}, sort_keys=True).encode()).hexdigest()
            upstream = stamp
            done = json.loads(stamp_path.read_text()) if stamp_path.exists() else {}
            if not force and output.exists() and done.get("stamp") == stamp:
                timings[notebook.stem] = done.get("wall_s", 0.0)
                if done.get("peak_rss_mib") is not None:
                    peaks[notebook.stem] = done["peak_rss_mib"]
                print(f"[{i}/{len(notebooks)}] {notebook.name}: up to date, skipped", flush=True)
                continue
            print(f"[{i}/{len(notebooks)}] {notebook.name} ({profile}) ...", flush=True)
            t0 = time.perf_counter()
            for attempt in range(1 + HANG_RETRIES):
                try:
                    with kts_io.atomic_path(output) as tmp:
                        try:
                            # each notebook gets the parameters its own parameters cell declares
                            with config.filtered_stderr(), PeakMemory() as memory:  # the kernels' C++ noise
                                execute_notebook(notebook, tmp, {k: v for k, v in params.items()
                                                                 if k in declared[notebook.name]},
                                                 cell_timeout=cell_timeout)
                        except pm.PapermillExecutionError as exc:
                            raise NotebookFailed(f"{notebook.name}: cell {exc.exec_count} failed with "
                                                 f"{exc.ename}: {exc.evalue}") from None
                    break
                except CellTimeoutError:
                    if attempt == HANG_RETRIES:
                        raise NotebookFailed(f"{notebook.name}: a cell went {cell_timeout:.0f} s without a reply from "
                                             f"its kernel, {attempt + 1} times; hung (or slower than the profile's "
                                             "cell_timeout_s allows)") from None
                    print(f"[{i}/{len(notebooks)}] {notebook.name}: a cell went {cell_timeout:.0f} s without a reply "
                          "from its kernel (hung); running the notebook again in a fresh kernel", flush=True)
            timings[notebook.stem] = round(time.perf_counter() - t0, 1)
            peaks[notebook.stem] = memory.peak_mib
            # the commit the notebook ran at: kts publish gives it to the notebook's copy
            kts_io.write_json(stamp_path, {"stamp": stamp, "wall_s": timings[notebook.stem],
                                           "peak_rss_mib": peaks[notebook.stem], "git_commit": config.git_commit()})
            print(f"[{i}/{len(notebooks)}] {notebook.name}: done in {timings[notebook.stem]:.0f} s", flush=True)
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if only:  # a partial run: the other notebooks' results stay, and so do their wall times and peaks
        timings = _keep_previous(timings, _previous(results / "metrics.json", profile, seed, "wall_s_per_notebook"),
                                 every_name)
        peaks = _keep_previous(peaks, _previous(results / "metrics.json", profile, seed, "peak_rss_mib_per_notebook"),
                               every_name)
    metrics = _collect(results, profile, seed, timings, peaks)
    kts_io.write_json(results / "metrics.json", metrics)
    return metrics


def annotate(results: str | os.PathLike, note: str) -> Path:
    """Store ``note`` as ``provenance.note`` of ``results/metrics.json`` (an empty note removes it)."""
    path = Path(results) / "metrics.json"
    if not path.is_file():
        raise ValueError(f"{path}: no metrics.json to annotate; run the pipeline first")
    metrics = json.loads(path.read_text())
    provenance = metrics.setdefault("provenance", {})
    if note:
        provenance["note"] = note
    else:
        provenance.pop("note", None)
    return kts_io.write_json(path, metrics)


def _previous(path: Path, profile: str, seed: int, key: str) -> dict[str, float]:
    """Provenance ``key`` (per notebook) of an earlier run of this profile and seed in ``path`` (empty if none)."""
    if not path.is_file():
        return {}
    provenance = json.loads(path.read_text()).get("provenance", {})
    same = provenance.get("profile") == profile and provenance.get("seed", seed) == seed
    return dict(provenance.get(key, {})) if same else {}


def _keep_previous(now: dict, before: dict, names: list[str]) -> dict:
    """This run's value per notebook, else the earlier run's, in reading order."""
    return {name: now[name] if name in now else before[name] for name in names if name in now or name in before}


def _collect(results: Path, profile: str, seed: int, timings: dict, peaks: dict) -> dict[str, Any]:
    notebook_metrics = {}
    for path in sorted((results / "metrics").glob("*.json")):
        notebook_metrics[path.stem] = json.loads(path.read_text())
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "provenance": {"git_commit": config.git_commit(), "profile": profile, "seed": seed,
                       "versions": config.versions(), "wall_s_per_notebook": timings,
                       "wall_s_total": round(sum(timings.values()), 1),
                       "peak_rss_mb_children": round(peak_kib / 1024, 1), "peak_rss_mib_per_notebook": peaks,
                       "cpu_count": os.cpu_count(),
                       **config.cpu()},
        "notebooks": notebook_metrics,
    }


def parse_parameter(text: str) -> tuple[str, Any]:
    """``"SEEDS=1"`` -> ``("SEEDS", 1)``; ``"PARTITION=TD-60% VD-20%"`` keeps the string."""
    import argparse
    import ast

    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with a Python name; got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="kts run", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=config.default_profile(), choices=sorted(config.PROFILES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=None, help="results folder (default results/ or results/<profile>)")
    parser.add_argument("--runs", default=None, help="executed notebooks (default runs/<profile>)")
    parser.add_argument("--work", default=None, help="checkpoints (default work/<profile>)")
    parser.add_argument("--data", default=None, help="data folder (default data/)")
    parser.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 01 02")
    parser.add_argument("--force", action="store_true", help="re-run notebooks even when up to date")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE", type=parse_parameter,
                        help="a notebook parameter for every notebook, as papermill's -p (e.g. -p SEEDS 1 is "
                             "-p SEEDS=1); the value is read as a Python literal, else kept as a string")
    parser.add_argument("--note", default=None,
                        help="a sentence stored as provenance.note in metrics.json (what this run reused or left "
                             "out); README's results section prints it")
    parser.add_argument("--update-readme", action="store_true",
                        help="only regenerate README's results and benchmark sections from the results folder")
    args = parser.parse_args(argv)
    if args.update_readme:
        if args.note is not None:
            annotate(args.results or config.results_dir("paper"), args.note)
        print(f"kts run: updated {update_readme(args.results).name}")
        return 0
    try:
        metrics = run(args.profile, args.seed, args.results, args.runs, args.work, args.data, args.only, args.force,
                      parameters=dict(args.param) or None)
    except (NotebookFailed, ValueError, OSError) as exc:  # KtsInputError is a ValueError
        print(f"kts run: {exc}", file=sys.stderr)
        return 1
    if args.note is not None:
        annotate(args.results or config.results_dir(args.profile), args.note)
    if args.profile == "paper" and args.results is None:
        update_readme()
    wall = metrics["provenance"]["wall_s_total"]
    print(f"kts run: {len(metrics['provenance']['wall_s_per_notebook'])} notebooks, {wall:.0f} s; "
          f"results in {args.results or config.results_dir(args.profile)}")
    return 0


# --- README's generated sections --------------------------------------------------------------

def results_section(results: str | os.PathLike) -> str:
    """The README's "Results" section, generated from ``results/`` (never typed in)."""
    results = Path(results)
    metrics = json.loads((results / "metrics.json").read_text()) if (results / "metrics.json").exists() else {}
    prov = metrics.get("provenance", {})
    lines = [f"From a `{prov.get('profile', '?')}`-profile run (seed {prov.get('seed', '?')}, commit "
             f"`{(prov.get('git_commit') or 'unknown')[:10]}`, {prov.get('wall_s_total', 0) / 60:.0f} min on "
             f"{prov.get('cpu_count', '?')} cores{', ' + prov['cpu_model'] if prov.get('cpu_model') else ''}) on the "
             "**phantom**: these are not the paper's data.", ""]
    if prov.get("note"):
        lines += [f"*This run: {prov['note']}.*", ""]
    if (results / "table1.md").exists():
        table = (results / "table1.md").read_text().split("\n\n", 2)[-1]
        lines += ["**Table I**, regenerated (`results/table1.md`, `results/table1.csv`):", "", table.strip(), ""]
    if (results / "tumor_stage.md").exists():
        lines += ["**The tumour stage on held-out kidney crops** (notebook 03, `results/tumor_stage.md`; TD-70%/VD-6% "
                  "test cases, crops cut from the true kidneys, pooled per MR weighting): Mask R-CNN fine-tuned from "
                  "kts's pretrained start, the same detector from scratch, and a dense reference that is not the "
                  "paper's method (errata E35, E38):", "", (results / "tumor_stage.md").read_text().strip(), ""]
    if (results / "contrasts.md").exists():
        table = (results / "contrasts.md").read_text().split("\n\n", 1)[-1]
        lines += ["**Unseen MR contrasts** (notebook 07, `results/contrasts.md`): kidney Dice of a CU-Net trained "
                  "without one weighting, on the weightings it saw, on the one it did not and, where the run scored it, "
                  "on the weightings it saw at the phantom's hard difficulty; with each recipe's epochs and seconds per "
                  "epoch where the run recorded them:", "", table.strip(), ""]
    for stem, caption in (("fig5_cascade_segmentation_results", "Figure 5: input, ground truth, CU-Net kidney "
                                                               "segment, Mask R-CNN tumour lineation"),
                          ("fig6_cunet_accuracy_loss_per_epoch", "Figure 6: CU-Net accuracy and loss per epoch"),
                          ("fig1_kidney_no_mild_moderate_tumor", "Figure 1: no, mild and moderate tumour"),
                          ("fig3_mr_slice_and_ground_truth", "Figure 3: an MR slice and its ground truth")):
        if (results / f"{stem}.png").exists():
            lines += [f"![{caption}](results/{stem}.png)", "", f"*{caption}.*", ""]
    return "\n".join(lines).rstrip() + "\n"


def replace_block(text: str, name: str, body: str) -> str:
    """Replace what stands between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise ValueError(f"README has no {start} ... {end} block")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body.rstrip()}\n{end}{tail}"


# The figures kts aims for on the phantom (the issues' goals): key, what, comparison, threshold.
GOALS: tuple[tuple[str, str, str, float], ...] = (
    ("kidney_dice", "kidney Dice, held-out slices (Table I, each partition)", ">=", 0.95),
    ("tumor_dice", "tumour Dice, held-out slices (Table I, each partition)", ">=", 0.85),
    ("instance_f1", "tumour instance F1 at IoU 0.5 (Table I, each partition)", ">=", 0.90),
    ("maskrcnn_over_reference", "Mask R-CNN tumour Dice / the dense reference's (held-out crops, pooled)", ">=", 0.95),
    ("unseen_contrast_dice", "kidney Dice on a left-out MR weighting (notebook 07: the best recipe, on its "
     "worst left-out weighting)", ">=", 0.90),
    ("unseen_over_seen_dice", "kidney Dice on a left-out MR weighting / on the weightings it saw (notebook 07: the "
     "best recipe, on its worst left-out weighting)", ">=", 0.95),
    ("hard_difficulty_dice", "kidney Dice at the phantom's hard difficulty, seen weightings (notebook 07: the best "
     "recipe, on its worst run)", ">=", 0.90),
    ("synth_epoch_time_ratio", "seconds per CU-Net epoch, domain-randomised recipe (synth) / the paper recipe's "
     "(notebook 07, each left-out weighting)", "<=", 1.5),
    ("paper_min_per_seed", "paper profile: minutes per seed of the split study (notebook 05, plus notebook 02 and "
     "03's Mask R-CNN training, which train 05's TD-70%/VD-6% models)", "<=", 60),
)


def _meets(value: float | None, comparison: str, threshold: float) -> bool | None:
    if value is None or value != value:  # missing or NaN
        return None
    return value >= threshold if comparison == ">=" else value <= threshold


def goal_values(results: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Each of ``GOALS`` measured from ``results/`` (and ``bench.json``): value(s), met (True/False/None)."""
    import pandas as pd

    results = Path(results)
    measured: dict[str, list[float]] = {}
    if (results / "table1.csv").exists():
        table = pd.read_csv(results / "table1.csv")
        for key in ("kidney_dice", "tumor_dice", "instance_f1"):
            measured[key] = [float(v) for v in table[f"{key}_mean"]]
    if (results / "tumor_stage.csv").exists():
        stage = pd.read_csv(results / "tumor_stage.csv")
        pooled = stage[stage["weighting"] == "pooled"].set_index("model")["tumor_dice"]
        ours = [v for k, v in pooled.items() if str(k).startswith("Mask R-CNN (pretrained")]
        reference = [v for k, v in pooled.items() if str(k).startswith("dense reference")]
        if ours and reference and reference[0] > 0:
            measured["maskrcnn_over_reference"] = [float(ours[0] / reference[0])]
    if (results / "contrasts.csv").exists():
        contrasts = pd.read_csv(results / "contrasts.csv")
        worst = contrasts.groupby("intensity")["test_unseen_dice"].min()
        measured["unseen_contrast_dice"] = [float(worst.max())]
        ratio = contrasts["test_unseen_dice"] / contrasts["test_seen_dice"]
        measured["unseen_over_seen_dice"] = [float(ratio.groupby(contrasts["intensity"]).min().max())]
        if "test_hard_dice" in contrasts.columns:
            measured["hard_difficulty_dice"] = [float(contrasts.groupby("intensity")["test_hard_dice"].min().max())]
        if "s_per_epoch" in contrasts.columns:
            from kts.contrasts import epoch_time_ratio

            ratios = epoch_time_ratio(contrasts)[contrasts["intensity"] == "synth"]
            measured["synth_epoch_time_ratio"] = [float(v) for v in ratios if v == v]
    metrics = json.loads((results / "metrics.json").read_text()) if (results / "metrics.json").exists() else {}
    walls = metrics.get("provenance", {}).get("wall_s_per_notebook", {})
    n_seeds = metrics.get("notebooks", {}).get("05_table1_split_study", {}).get("n_seeds")
    tumor_training = metrics.get("notebooks", {}).get("03_train_maskrcnn", {}).get("timing", {}).get("total_s")
    parts = [walls.get("02_train_cunet"), tumor_training, walls.get("05_table1_split_study")]
    if all(parts) and n_seeds and metrics.get("provenance", {}).get("profile") == "paper":
        measured["paper_min_per_seed"] = [sum(parts) / 60 / n_seeds]
    out = {}
    for key, what, comparison, threshold in GOALS:
        values = measured.get(key)
        met = [_meets(v, comparison, threshold) for v in values] if values else []
        out[key] = {"what": what, "goal": f"{comparison} {threshold:g}", "values": values,
                    "n_met": sum(bool(m) for m in met), "met": (all(met) if met else None)}
    return out


def goals_section(results: str | os.PathLike) -> str:
    """README's "Goals, met or missed" table, generated from ``results/`` and ``results/bench.json``."""
    results = Path(results)
    rows = []
    for goal in goal_values(results).values():
        values = goal["values"]
        if not values:
            shown, verdict = "not measured in this run", "-"
        elif len(values) == 1:
            shown, verdict = f"{values[0]:.3g}", "met" if goal["met"] else "missed"
        else:
            shown = f"{min(values):.3f}-{max(values):.3f}"
            verdict = "met" if goal["met"] else f"missed ({goal['n_met']} of {len(values)} met)"
        rows.append((goal["what"], goal["goal"], shown, verdict))
    bench = json.loads((results / "bench.json").read_text()) if (results / "bench.json").exists() else {}
    date = str(bench.get("machine", {}).get("date", ""))[:10]
    for key, goal in sorted(bench.get("goals", {}).items()):
        value = goal.get("value")
        rows.append((f"benchmark ({date}): {key.replace('_', ' ')}", str(goal.get("goal")),
                     "not measured" if value is None else f"{value:.3g}",
                     "-" if goal.get("met") is None else ("met" if goal["met"] else "missed")))
    return kts_io.markdown_table(rows, ("goal", "target", "measured", "verdict")) + "\n"


def readme_blocks(results: str | os.PathLike) -> dict[str, str]:
    """README's generated blocks (name -> body), all rendered from ``results/``."""
    results = Path(results)
    blocks = {"results": results_section(results), "goals": goals_section(results)}
    if (results / "bench.md").exists():
        blocks["bench"] = (results / "bench.md").read_text()
    return blocks


def update_readme(results: str | os.PathLike | None = None, readme: str | os.PathLike | None = None) -> Path:
    """Regenerate README's results, goals and benchmark blocks from ``results/`` (``kts run --update-readme``)."""
    results = Path(results) if results is not None else config.results_dir("paper")
    readme = Path(readme) if readme is not None else config.project_root() / "README.md"
    text = readme.read_text()
    for name, body in readme_blocks(results).items():
        text = replace_block(text, name, body)
    return kts_io.write_text(readme, text)
