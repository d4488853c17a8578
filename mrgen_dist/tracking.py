"""Experiment tracking in ClearML; the only module that imports clearml.

Offline by default: without a configured server (no clearml.conf, no CLEARML_API_HOST) the task is written to
an offline session folder under `CLEARML_CACHE_DIR` (default ~/.clearml/cache) that
`clearml-task`/`Task.import_offline_session` can upload later. With a configured server the task is online,
after a short TCP probe of the API host so that an unreachable server is reported in seconds instead of a hang.
Only the main process reports; `train.tracker=none` (or `--tracker none`) turns tracking off.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


class Tracker:
    """No tracking: the interface, and what non-main processes and `--tracker none` get."""

    task_id: str | None = None
    offline_dir: Path | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_scalars(self, scalars: dict[str, float], step: int) -> None: ...

    def log_image(self, title: str, path: Path, step: int) -> None: ...

    def log_artifact(self, name: str, path: Path) -> None: ...

    def close(self) -> None: ...


def configured_server() -> str | None:
    """The API host of a configured ClearML server, or None when none is configured."""
    host = os.environ.get("CLEARML_API_HOST")
    if host:
        return host
    conf = os.environ.get("CLEARML_CONFIG_FILE") or str(Path.home() / "clearml.conf")
    if not Path(conf).is_file():
        return None
    from clearml.backend_api.session import Session

    return Session.get_api_server_host()


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection to the URL's host and port opens within `timeout`, else the reason."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{parsed.hostname}:{port} unreachable ({e})"


class ClearMLTracker(Tracker):
    def __init__(self, project: str, name: str, tags: list[str] | None = None, parent: str | None = None) -> None:
        # report from this process: the default background reporter process costs ~11 s at close()
        os.environ.setdefault("CLEARML_REPORT_USE_SUBPROCESS", "false")
        from clearml import Task

        server = None if os.environ.get("CLEARML_OFFLINE_MODE") else configured_server()
        if server is None:
            Task.set_offline(True)
        else:
            problem = probe(server)
            if problem:
                raise RuntimeError(
                    f"ClearML server {server} is configured but {problem}; fix clearml.conf, "
                    "set CLEARML_OFFLINE_MODE=1 to record offline, or use --tracker none"
                )
        self._task = Task.init(
            project_name=project,
            task_name=name,
            tags=tags,
            reuse_last_task_id=False,
            auto_connect_frameworks=False,
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
        for key, value in scalars.items():
            title, _, series = key.partition("_")
            self._logger.report_scalar(title=title, series=series or title, value=float(value), iteration=step)

    def log_image(self, title: str, path: Path, step: int) -> None:
        self._logger.report_image(title=title, series=Path(path).stem, iteration=step, local_path=str(path))

    def log_artifact(self, name: str, path: Path) -> None:
        self._task.upload_artifact(name, artifact_object=str(path), wait_on_upload=True)

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


def make_tracker(cfg, out: Path, enabled: bool) -> Tracker:
    """The run's tracker: ClearML on the main process when `train.tracker=clearml`, else a no-op."""
    if not enabled or cfg.train.tracker == "none":
        return Tracker()
    name = cfg.train.run_name or Path(cfg.train.out).name
    return ClearMLTracker(cfg.train.project, name, tags=["train"])
