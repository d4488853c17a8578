"""Experiment tracking in ClearML; the only module that imports clearml.

Offline by default: without a configured server (no clearml.conf, no CLEARML_API_HOST) the task is written to
an offline session folder under `CLEARML_CACHE_DIR` (default ~/.clearml/cache) that
`Task.import_offline_session` can upload to a server later. With a configured server the task is online,
after a short HTTP ping of the API host: an unreachable server is reported within seconds (Task.init would
hang for minutes) and the run records offline instead of failing.
Only the main process reports; `train.tracker=none` (or `--tracker none`) turns tracking off.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

PROBE_TIMEOUT_S = 3.0
_FRAMEWORKS = ("matplotlib", "tensorflow", "tensorboard", "pytorch", "xgboost", "scikit", "fastai", "lightgbm",
               "hydra", "tfdefines", "joblib", "megengine", "catboost", "gradio")


class Tracker:
    """No tracking: the interface, and what non-main processes and `--tracker none` get."""

    task_id: str | None = None
    offline_dir: Path | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_scalars(self, scalars: dict[str, float], step: int) -> None: ...

    def log_image(self, title: str, path: Path, step: int) -> None: ...

    def log_artifact(self, name: str, path: Path, copy: bool = False) -> None: ...

    def close(self) -> None: ...


def configured_server() -> str | None:
    """The API host of a configured ClearML server, or None when none is configured (no network access).

    clearml's own lookup falls back to its public SaaS host, so it cannot tell "configured" from "not".
    """
    for var in ("CLEARML_API_HOST", "CLEARML_WEB_HOST"):
        if os.environ.get(var):
            return os.environ[var]
    conf = Path(os.environ.get("CLEARML_CONFIG_FILE") or Path.home() / "clearml.conf")
    if not conf.is_file():
        return None
    from clearml.config import config_obj

    return config_obj.get("api.api_server", None) or config_obj.get("api.host", None) or None


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the server answers its ping within `timeout`, else the reason (an HTTP check: some networks
    accept TCP connections for any address)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/debug.ping", timeout=timeout) as reply:
            return None if reply.status == 200 else f"answered HTTP {reply.status}"
    except (OSError, ValueError) as e:
        return f"unreachable ({e})"


class ClearMLTracker(Tracker):
    def __init__(self, project: str, name: str, tags: list[str] | None = None, parent: str | None = None) -> None:
        from clearml import Task
        from clearml.config import config_obj

        # report from this process: the default background reporter makes close() take ~11 s
        config_obj.set_overrides({"sdk": {"development": {"report_use_subprocess": False}}})
        Task.set_random_seed(None)  # Task.init would otherwise reseed torch/numpy/random to 1337
        server = None if os.environ.get("CLEARML_OFFLINE_MODE") else configured_server()
        if server is not None and (problem := probe(server)):
            print(f"ClearML server {server} is configured but {problem}: recording OFFLINE instead "
                  "(upload later with Task.import_offline_session)", file=sys.stderr)
            server = None
        if server is None:
            Task.set_offline(True)
        self._task = Task.init(
            project_name=project,
            task_name=name,
            tags=tags,
            reuse_last_task_id=False,
            # no framework hooks, and no repository / package analysis: close() waits for it, seconds when a
            # virtual environment lies inside the working tree
            auto_connect_frameworks={name: False for name in _FRAMEWORKS} | {"detect_repository": False},
            auto_resource_monitoring=False,
            auto_connect_arg_parser=False,
            auto_connect_streams=False,
        )
        if parent:
            self._task.set_parent(parent)
        self._logger = self._task.get_logger()
        self.task_id = self._task.id
        self.offline_dir = Path(self._task.get_offline_mode_folder()) if server is None else None
        self.mode = "offline" if server is None else f"online ({server})"

    def log_params(self, params: dict[str, Any]) -> None:
        self._task.connect(_flatten(params), name="config")

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Keys are `title/series`, e.g. `loss/train`, so train and test share one plot."""
        for key, value in scalars.items():
            title, _, series = key.partition("/")
            self._logger.report_scalar(title=title, series=series or title, value=float(value), iteration=step)

    def log_image(self, title: str, path: Path, step: int) -> None:
        self._logger.report_image(title=title, series=Path(path).stem, iteration=step, local_path=str(path))

    def log_artifact(self, name: str, path: Path, copy: bool = False) -> None:
        """Online (or `copy`): the file is uploaded. Offline: the artifact is a file:// link to it, so the offline
        session does not copy (and zip at close, seconds for a 330 MB model) what already lies in the run folder."""
        if self.offline_dir is None or copy:
            self._task.upload_artifact(name, artifact_object=str(path), wait_on_upload=True)
        else:
            self._task.upload_artifact(name, artifact_object=Path(path).resolve().as_uri())

    def close(self) -> None:
        t0 = time.perf_counter()
        self._task.close()
        print(f"ClearML task {self.task_id} closed ({self.mode}, {time.perf_counter() - t0:.2f} s)"
              + (f": {self.offline_dir}" if self.offline_dir else ""), file=sys.stderr)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def create_parent(project: str, name: str) -> str:
    """A pipeline's parent task (created and closed at once); its id goes to the jobs that link to it."""
    tracker = ClearMLTracker(project, name, tags=["pipeline"])
    tracker.close()
    return tracker.task_id


def attach_to_parent(parent: str, project: str, files: list[Path]) -> str:
    """Attach files to the parent task. Online the parent itself gets them; an offline session cannot be
    reopened by another process, so offline they go to a 'report' task linked to the parent. Returns the id
    of the task that holds them."""
    from clearml import Task

    if not os.environ.get("CLEARML_OFFLINE_MODE") and configured_server() is not None:
        task = Task.get_task(task_id=parent)
        for f in files:
            task.upload_artifact(Path(f).name, artifact_object=str(f), wait_on_upload=True)
        return parent
    tracker = ClearMLTracker(project, "report", tags=["report"], parent=parent)
    for f in files:
        if Path(f).suffix == ".png":
            tracker.log_image("report", Path(f), 0)
        tracker.log_artifact(Path(f).name, Path(f), copy=True)
    tracker.close()
    return tracker.task_id


def make_tracker(cfg, out: Path, enabled: bool) -> Tracker:
    """The run's tracker: ClearML on the main process when `train.tracker=clearml`, else a no-op."""
    if not enabled or cfg.train.tracker == "none":
        return Tracker()
    name = cfg.train.run_name or Path(cfg.train.out).name
    return ClearMLTracker(cfg.train.project, name, tags=["train"])


