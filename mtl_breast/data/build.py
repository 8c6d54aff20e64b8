"""Building the cache of a dataset: every case preprocessed (`preprocess_case`, in worker processes when asked) and
stored (`CaseCache`); cases already cached from the same sources are skipped, bad cases are listed with their
reason, never fatal, and the lists go to `report.json` in the cache folder."""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any

import SimpleITK as sitk
from rich.progress import MofNCompleteColumn, Progress

from mtl_breast.acquisition import assumed_report
from mtl_breast.data.cache import CaseCache
from mtl_breast.data.case import Case, CaseError, source_fingerprint
from mtl_breast.data.folder import read_dataset
from mtl_breast.data.preprocess import PreprocessConfig, preprocess_case
from mtl_breast.files import write_text


def _process(case: Case, cache_root: str, config: PreprocessConfig) -> tuple[str, str | None]:
    """Preprocess and store one case; returns (patient_id, None) or (patient_id, reason it was skipped)."""
    try:
        CaseCache(cache_root, config).write(preprocess_case(case, config))
        return case.patient_id, None
    except CaseError as err:
        return case.patient_id, str(err)
    except Exception as err:  # one broken case (or a bug it triggers) must not stop a batch of a thousand
        return case.patient_id, f"{type(err).__name__}: {err}"


def _die_with(parent: int) -> None:
    """End this worker when `parent` ends, however it ends (a SIGKILL runs no clean-up in the parent).

    Linux: the kernel sends SIGKILL on the parent's death (PR_SET_PDEATHSIG). Elsewhere, and for a parent
    that died before the request, a daemon thread notices the worker has been re-parented.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _init_worker(threads: int, parent: int) -> None:
    _die_with(parent)
    # N processes x all-core ITK thread pools would oversubscribe the CPU.
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def preprocess_dataset(data: Path, cache: Path, config: PreprocessConfig, workers: int = 1,
                       cases: list[Case] | None = None, progress: bool = True) -> dict[str, Any]:
    """Preprocess every case of a dataset into the cache; bad cases are skipped and reported.

    Args:
        data: dataset root (read with `read_dataset` unless `cases` is given).
        cache: cache root; files go to `cache / config.key()`.
        config: preprocessing parameters.
        workers: processes (`ProcessPoolExecutor`, spawn start method) when > 1.
        cases: cases to process instead of reading `data`.
        progress: show a progress bar.

    Returns:
        {"done": [ids], "skipped": [{"patient_id", "reason"}], "cached": [ids already in the cache],
        "stale": [ids whose cached file was made from other source files or table values, preprocessed again],
        "assumed": `acquisition.assumed_report` of the done and cached cases (the acquisition values assumed for
        them, counted, and its one-line text), "report_path": str}; the same lists are written atomically to
        `<cache>/<key>/report.json`.
    """
    started = time.perf_counter()
    skipped: list[dict[str, str]] = []
    if cases is None:
        cases = read_dataset(data, skipped=skipped)
        if not cases and not skipped:  # a job that found nothing to do has not succeeded
            raise FileNotFoundError(f"no cases found in {data} (expected a MAMA-MIA root with images/<PID>/"
                                    "<pid>_0000.nii.gz, or one folder of .nii[.gz]/.mha/.nrrd phase files per case)")
    store = CaseCache(cache, config)
    store.dir.mkdir(parents=True, exist_ok=True)
    todo, cached, stale, seen = [], [], [], set()
    for case in cases:
        if case.patient_id.lower() in seen:
            skipped.append({"patient_id": case.patient_id, "reason": "duplicate patient id"})
        elif store.has(case.patient_id, source_fingerprint(case)):
            cached.append(case.patient_id)
        else:
            if store.has(case.patient_id):  # cached from other source files or table values
                stale.append(case.patient_id)
            todo.append(case)
        seen.add(case.patient_id.lower())

    done = []
    pool = None
    if workers > 1 and len(todo) > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(threads, os.getpid()))
    try:
        if pool is None:
            results = (_process(case, str(cache), config) for case in todo)
        else:
            results = (f.result() for f in as_completed([pool.submit(_process, c, str(cache), config) for c in todo]))
        with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), disable=not progress) as bar:
            task = bar.add_task(f"preprocess -> {store.dir}", total=len(todo))
            for pid, reason in results:
                if reason is None:
                    done.append(pid)
                else:
                    skipped.append({"patient_id": pid, "reason": reason})
                bar.advance(task)
    finally:
        if pool is not None:  # on Ctrl-C, drop queued cases instead of waiting for all of them
            pool.shutdown(cancel_futures=True)

    # The cases now in the cache, each once (a duplicate id was skipped; its first occurrence is the one stored).
    stored, kept = set(done) | set(cached), {}
    for case in cases:
        if case.patient_id in stored:
            kept.setdefault(case.patient_id, case)
    report = {"data": str(data), "cache": str(store.dir), "config": asdict(config), "key": config.key(),
              "done": sorted(done), "skipped": skipped, "cached": cached, "stale": stale,
              "assumed": assumed_report(case.assumed() for case in kept.values()),
              "seconds": round(time.perf_counter() - started, 2)}
    report_path = store.dir / "report.json"
    write_text(report_path, json.dumps(report, indent=2))
    return {"done": report["done"], "skipped": skipped, "cached": cached, "stale": stale,
            "assumed": report["assumed"], "report_path": str(report_path)}
