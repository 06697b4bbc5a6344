"""Package layout rules (STYLE.md): no import circles between modules, and only the tracking
modules import mlflow. Imports anywhere in a module count (inside functions and under
TYPE_CHECKING too)."""
from __future__ import annotations

import ast
from pathlib import Path

import anomaly_vae

PKG = Path(anomaly_vae.__file__).parent
MLFLOW_MODULES = {"anomaly_vae.store", "anomaly_vae.tracking", "anomaly_vae.registry", "anomaly_vae.mlflow_model",
                  "anomaly_vae.scoring_runs"}


def _module_name(file: Path) -> str:
    parts = file.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(file: Path) -> set[str]:
    """Absolute names of everything `file` imports (modules, or package.name for `from . import x`)."""
    mod = _module_name(file)
    base = mod.split(".") if file.name == "__init__.py" else mod.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                root = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            out.add(root)
            out |= {f"{root}.{a.name}" for a in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(f): f for f in PKG.rglob("*.py")}
    return {m: {d for d in _imports(f) if d in files and d not in (m, "anomaly_vae")} for m, f in files.items()}


def test_no_import_circles():
    graph = _graph()
    assert {"anomaly_vae.detector", "anomaly_vae.evaluate", "anomaly_vae.persist"} <= set(graph)
    state: dict[str, int] = {}           # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            assert state.get(dep) != 1, "import circle: " + " -> ".join(path[path.index(dep):] + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])


def test_lower_modules_do_not_import_the_detector():
    graph = _graph()
    for low in ("anomaly_vae.evaluate", "anomaly_vae.persist", "anomaly_vae.score", "anomaly_vae.drift"):
        assert "anomaly_vae.detector" not in graph[low], low


def test_only_tracking_modules_import_mlflow():
    offenders = {_module_name(f) for f in PKG.rglob("*.py")
                 if any(n.split(".")[0] == "mlflow" for n in _imports(f))} - MLFLOW_MODULES
    assert not offenders, offenders


def test_scoring_a_saved_model_imports_neither_sklearn_nor_scipy(fitted, frame, tmp_path):
    """`anomaly-vae score` loads a FittedDetector: importing sklearn (which imports scipy.stats)
    cost more than 1 s per invocation. The same scores as the estimator's, in a fresh interpreter
    running the real CLI's streaming path."""
    import subprocess
    import sys

    import numpy as np
    import pyarrow.parquet as pq

    model = fitted.save(tmp_path / "model")
    frame.head(300).to_parquet(tmp_path / "rows.parquet")
    code = (
        "import sys\n"
        "from anomaly_vae.fitted import FittedDetector\n"
        "from anomaly_vae import batch\n"
        f"det = FittedDetector.load({str(model)!r})\n"
        f"batch.score_files(det, [{str(tmp_path / 'rows.parquet')!r}], {str(tmp_path / 'out')!r})\n"
        "print(sorted(m for m in ('sklearn', 'scipy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    scored = pq.read_table(tmp_path / "out" / "rows.scored.parquet")["anomaly_score"].to_numpy()
    np.testing.assert_array_equal(scored, fitted.anomaly_score(frame.head(300)))
