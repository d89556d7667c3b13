"""The ``kts`` command: ``kts run`` (the notebooks), ``kts fetch`` (real data), ``kts manifest``, ``kts bench``, ``kts pretrain``, ``kts students``, ``kts publish``, ``kts propose``."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "run": ("kts.pipeline", "execute every notebook headlessly (papermill)"),
        "fetch": ("kts.fetch", "download manifest series from TCIA or IDC"),
        "manifest": ("kts.manifest", "build, check or review data_manifest.csv"),
        "bench": ("kts.bench", "measure speed against this machine's ceiling"),
        "pretrain": ("kts.pretrain", "pretrain the tumour stage's Mask R-CNN on a synthetic corpus"),
        "students": ("kts.teaching", "write student copies of the notebooks, without solutions"),
        "publish": ("kts.publish", "make a run's executed notebooks readable on the forge (docs/executed)"),
        "propose": ("kts.proposals", "draft kidney masks for an MR series as a DICOM-SEG, for review"),
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: kts {run,fetch,manifest,bench,pretrain,students,publish,propose} [options]\n")
        for name, (_, text) in commands.items():
            print(f"  {name:<9} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    module = importlib.import_module(commands[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
