"""Check `xsel export-labels --format label-studio` against a real Label Studio started on this machine.

Writes a small DICOM folder (several patients, views, a MONOCHROME1 image), scans it, makes a selection,
exports it for Label Studio, then starts Label Studio locally (telemetry off, its own data folder, local-file
serving rooted at the work folder), creates a project with the exported labelling config, adds a local-files
storage for the PNGs, imports tasks.json through the API, and checks: the task count, the score and metadata
fields in every task, that a Data Manager view sorted by ascending score returns the tasks in reverse rank
order (tasks are imported in rank order, so this proves the sort), and that the first image is served.
Label Studio is stopped at the end, whatever happens.

    python bench/check_label_studio.py --install   # create .venv-ls with label-studio, then check (the make target)
    python bench/check_label_studio.py [--label-studio .venv-ls/bin/label-studio] [--work-dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))  # the test helper that writes DICOM files

from tests.dicom_folder import write_site_folder  # noqa: E402
from xsel.labelling import export_labels  # noqa: E402
from xsel.scan import scan_folder  # noqa: E402

VENV = REPOSITORY / ".venv-ls"
REQUIREMENT = "label-studio>=1.23"
USER, PASSWORD, TOKEN = "check@xsel.local", "xsel-check-password", "xselchecktoken0123456789"
TELEMETRY_OFF = {"COLLECT_ANALYTICS": "false", "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": ""}


def install() -> Path:
    """A virtual environment of its own for Label Studio (its Django stack stays out of xsel's)."""
    binary = VENV / "bin" / "label-studio"
    if not binary.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "--quiet", REQUIREMENT], check=True)
    return binary


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def export_queue(work: Path) -> tuple[Path, list[dict]]:
    """A DICOM folder → a selection of its chest images in a fixed order → a Label Studio export."""
    folder = work / "pacs"
    write_site_folder(folder)
    table = scan_folder(folder, chest_only=True, show_progress=False).table
    selection = table.assign(rank=range(1, len(table) + 1), score=[1.0 - 0.1 * i for i in range(len(table))])
    selection = selection.assign(selector="typiclust")[["rank", "Path", "score", "selector", *table.columns[1:]]]
    selection_csv = work / "to_label.csv"
    selection.to_csv(selection_csv, index=False)
    out = work / "queue"
    export_labels(selection_csv, out, format="label-studio", image_root=folder, document_root=work, show_progress=False)
    return out, json.loads((out / "tasks.json").read_text())


class LabelStudio:
    """A Label Studio server in a process group of its own, stopped on exit."""

    def __init__(self, binary: Path, work: Path, port: int):
        self.url = f"http://127.0.0.1:{port}"
        environment = {
            **os.environ,
            **TELEMETRY_OFF,
            "LABEL_STUDIO_BASE_DATA_DIR": str(work / "label-studio-data"),
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(work),
        }
        command = [
            str(binary), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
            "--username", USER, "--password", PASSWORD, "--user-token", TOKEN, "--enable-legacy-api-token",
        ]  # fmt: skip
        self.log = open(work / "label-studio.log", "w")  # noqa: SIM115  (closed in stop)
        self.process = subprocess.Popen(
            command, env=environment, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait(self, timeout: float = 240) -> float:
        started = time.perf_counter()
        while time.perf_counter() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"label-studio exited with code {self.process.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return time.perf_counter() - started
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(2)
        raise RuntimeError(f"label-studio did not answer /health within {timeout:.0f} s; see {self.log.name}")

    def api(self, method: str, path: str, payload=None, *, raw: bool = False):
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"Token {TOKEN}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"{method} {path}: HTTP {error.code}: {error.read()[:500]!r}") from None
        return body if raw else json.loads(body or b"null")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def check(server: LabelStudio, out: Path, tasks: list[dict]) -> list[str]:
    """Create a project, import the tasks and check what came back; returns one line per passed check."""
    config = (out / "label_config.xml").read_text()
    project = server.api("POST", "/api/projects", {"title": "xsel export check", "label_config": config})
    storage = {"project": project["id"], "title": "xsel PNGs", "path": str(out / "images"), "use_blob_urls": False}
    server.api("POST", "/api/storages/localfiles/", storage)
    imported = server.api("POST", f"/api/projects/{project['id']}/import", tasks)
    if imported.get("task_count") != len(tasks):
        raise AssertionError(f"import reported {imported.get('task_count')} tasks, expected {len(tasks)}: {imported}")
    listed = server.api("GET", f"/api/tasks?project={project['id']}&page_size=1000&fields=all")
    stored = listed["tasks"] if isinstance(listed, dict) else listed
    if len(stored) != len(tasks):
        raise AssertionError(f"the project holds {len(stored)} tasks, expected {len(tasks)}")
    for task in stored:
        data = task["data"]
        if not isinstance(data.get("score"), float) or not isinstance(data.get("rank"), int) or "PatientID" not in data:
            raise AssertionError(f"task {task['id']} lacks a numeric score/rank or PatientID: {data}")
    view = server.api(
        "POST",
        "/api/dm/views",
        {
            "project": project["id"],
            "data": {"ordering": ["tasks:data.score"], "filters": {"conjunction": "and", "items": []}},
        },
    )
    ordered = server.api("GET", f"/api/tasks?view={view['id']}&page_size=1000&fields=all")
    ranks = [t["data"]["rank"] for t in (ordered["tasks"] if isinstance(ordered, dict) else ordered)]
    if ranks != sorted(ranks, reverse=True):
        raise AssertionError(f"the Data Manager view sorted by ascending score gives ranks {ranks}")
    image = server.api("GET", tasks[0]["data"]["image"], raw=True)
    if not image.startswith(b"\x89PNG"):
        raise AssertionError(f"{tasks[0]['data']['image']} did not serve a PNG")
    return [
        f"project {project['id']} created with the exported labelling config",
        f"{len(tasks)} tasks imported; each has a numeric score and rank and the DICOM metadata",
        f"Data Manager view sorted by ascending score returns ranks {ranks}",
        f"{tasks[0]['data']['image']} serves the PNG ({len(image)} bytes)",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help=f"Create {VENV.name} with {REQUIREMENT} first.")
    parser.add_argument("--label-studio", type=Path, default=VENV / "bin" / "label-studio")
    parser.add_argument("--work-dir", type=Path, default=None, help="Default: a temporary folder, removed after.")
    parser.add_argument("--keep", action="store_true", help="Leave the work folder (with Label Studio's log).")
    args = parser.parse_args()
    binary = install() if args.install else args.label_studio
    if not binary.is_file():
        print(f"{binary} not found: run with --install (or `make labelstudio-check`)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="xsel-ls-") if args.work_dir is None else args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out, tasks = export_queue(work)
    server = LabelStudio(binary, work, free_port())
    try:
        seconds = server.wait()
        print(f"Label Studio answered /health after {seconds:.1f} s at {server.url}")
        for line in check(server, out, tasks):
            print(f"  ok: {line}")
    finally:
        server.stop()
        if args.work_dir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("Label Studio check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
