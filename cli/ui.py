"""`gnr ui`: open the MLflow UI on the local store that `gnr train` writes to."""

import os
import subprocess
import sys
from typing import Optional

import typer


def ui(
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="Default: the local gnr store."),
    port: int = typer.Option(5000, "--port"),
    host: str = typer.Option("127.0.0.1", "--host"),
) -> None:
    """Start `mlflow ui` on the local store (Ctrl-C to stop)."""
    from gnr import paths
    from gnr.cli.common import err_console
    from gnr.tracking import UI_VIEW

    uri = tracking_uri or paths.local_tracking_uri()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if uri == paths.local_tracking_uri():
        cmd += ["--default-artifact-root", str(paths.local_artifact_root())]
    # The link opens the UI on its model-training views (MLflow 3.17 opens on GenAI otherwise).
    err_console.print(f"MLflow UI: http://{host}:{port}/#/experiments{UI_VIEW}", highlight=False, markup=False)
    raise typer.Exit(subprocess.call(cmd, env=os.environ.copy()))
