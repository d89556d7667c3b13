"""Test-session settings shared by the unit tests and nbval's notebook runs.

The notebooks run under nbval in the quick profile (``KTS_PROFILE=quick``) and write into one
session folder, so the pipeline test (which runs first) and nbval share trained models instead of
training them twice. An outer environment may set these variables itself.
"""
import os
import tempfile

os.environ.setdefault("KTS_PROFILE", "quick")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("MPLBACKEND", "Agg")
_created = "KTS_TEST_BASE" not in os.environ
_base = os.environ.setdefault("KTS_TEST_BASE", tempfile.mkdtemp(prefix="kts-test-"))
for _name, _sub in (("KTS_DATA_DIR", "data"), ("KTS_WORK_DIR", "work"), ("KTS_RESULTS_DIR", "results")):
    os.environ.setdefault(_name, os.path.join(_base, _sub))


# nbval waits a hard-coded 5 s for each kernel message after a cell's execute_reply
# (computationalmodelling/nbval issues #136 and #231; not configurable in nbval 0.11). On a busy
# 2-core CI machine the IOPub thread of a kernel that has just trained can lag longer than that, and
# the cell fails with "Timeout of 5 seconds exceeded waiting for output" although it ran. Cells keep
# their own execution limit (--nbval-cell-timeout); only this grace period is raised.
NBVAL_OUTPUT_TIMEOUT_S = 120


def pytest_collection_modifyitems(config, items):
    """Give nbval's cells a longer wait for their outputs (see NBVAL_OUTPUT_TIMEOUT_S)."""
    for item in items:
        if hasattr(item, "output_timeout"):  # nbval.plugin.IPyNbCell
            item.output_timeout = NBVAL_OUTPUT_TIMEOUT_S


def pytest_sessionfinish(session, exitstatus):
    """Remove the session folder this conftest created (set KTS_KEEP_TEST_BASE=1 to keep it)."""
    import shutil

    if _created and not os.environ.get("KTS_KEEP_TEST_BASE"):
        shutil.rmtree(_base, ignore_errors=True)
