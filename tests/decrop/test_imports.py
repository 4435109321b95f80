import subprocess
import sys


def test_decrop_imports_no_ray_mlflow_or_optuna():
    """decrop/ is a pure PyTorch library: importing all of it in a fresh interpreter pulls in no tracking or
    distributed framework (tuning/ owns those)."""
    code = (
        "import importlib, pkgutil, sys, decrop\n"
        "for m in pkgutil.walk_packages(decrop.__path__, 'decrop.'):\n"
        "    if m.name != 'decrop.__main__': importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in {'ray', 'mlflow', 'optuna'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout
