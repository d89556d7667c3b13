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


def pytest_sessionfinish(session, exitstatus):
    """Remove the session folder this conftest created (set KTS_KEEP_TEST_BASE=1 to keep it)."""
    import shutil

    if _created and not os.environ.get("KTS_KEEP_TEST_BASE"):
        shutil.rmtree(_base, ignore_errors=True)
