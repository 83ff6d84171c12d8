"""The process-wide settings: applied by one explicit call, never on import."""

import subprocess
import sys

from napari_sam.core import runtime
from napari_sam.model import matmul


def test_importing_the_package_changes_no_setting():
    code = "import napari_sam.model.matmul as m, napari_sam.core.predictor; print(m.enabled)"
    env = {"NAPARI_SAM_ONEDNN": "1", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"


def test_the_setting_follows_the_variable_then_the_processor(monkeypatch):
    monkeypatch.setattr(matmul, "faster_here", lambda: True)
    assert runtime.onednn_wanted(None) and runtime.onednn_wanted("") and runtime.onednn_wanted("1")
    assert not runtime.onednn_wanted("0")
    monkeypatch.setattr(matmul, "faster_here", lambda: False)
    assert not runtime.onednn_wanted(None) and runtime.onednn_wanted(" 1 ") and not runtime.onednn_wanted("0")


def test_configure_runtime_applies_and_reports(monkeypatch):
    monkeypatch.setattr(matmul, "enabled", False)
    monkeypatch.setenv(runtime.ONEDNN_ENV_VAR, "1")
    settings = runtime.configure_runtime()
    assert settings.onednn is True and matmul.enabled is True
    assert runtime.configure_runtime(onednn=False).onednn is False and matmul.enabled is False


def test_load_model_applies_the_settings(monkeypatch, tiny_checkpoint):
    from napari_sam.core.models import load_model

    monkeypatch.setattr(matmul, "enabled", False)
    monkeypatch.setenv(runtime.ONEDNN_ENV_VAR, "1")
    load_model(tiny_checkpoint, device="cpu")
    assert matmul.enabled is True
