"""`tuning.torch_backend`: a DDP trainer whose building and fit() never load torch in the calling process.

A fresh Python (the calling process of a Tune trial, where nothing imported torch before) runs a real 2-worker gloo
fit through `torch_trainer`: the workers see an initialised process group of world size 2 and all-reduce
across it, and the caller still has no torch afterwards. ~30 s (a Ray of its own in the subprocess).
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.ray

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import ray, ray.train
    from tuning.torch_backend import torch_trainer

    def loop(config):  # pickled by value: the workers import torch, not this process
        import torch
        import torch.distributed as dist
        total = torch.tensor([float(ray.train.get_context().get_world_rank() + 1)])
        dist.all_reduce(total)
        return {"initialised": dist.is_initialized(), "backend": dist.get_backend(),
                "world": dist.get_world_size(), "sum": total.item()}

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    trainer = torch_trainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=2),
                            run_config=ray.train.RunConfig(name="backend", storage_path=sys.argv[2]))
    result = trainer.fit()
    print(json.dumps({**result.return_value, "torch_here": "torch" in sys.modules}))
""")


def test_two_worker_gloo_fit_without_torch_in_the_caller(tmp_path):
    env = {"RAY_ADDRESS": "local", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO), str(tmp_path)], capture_output=True, text=True,
                         timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["initialised"] and result["backend"] == "gloo" and result["world"] == 2
    assert result["sum"] == 3.0  # ranks 0 and 1 contributed 1 and 2
    assert result["torch_here"] is False
