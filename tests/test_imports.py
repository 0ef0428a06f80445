"""What runs on accelerator images imports without TensorFlow, tfds, CLU, ml_collections or torch (they have none)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = [
    "uit_jax.models.layers",
    "uit_jax.models.clip",
    "uit_jax.models.convert",
    "uit_jax.models.decoder",
    "uit_jax.models.uit",
    "uit_jax.losses",
    "uit_jax.metrics",
    "uit_jax.optim",
    "uit_jax.sharding",
    "uit_jax.steps",
    "uit_jax.config",
    "uit_jax.state",
    "uit_jax.checkpoint",
    "uit_jax.evaluate",
    "uit_jax.data.eval_input",
    # search with a trained model (issue: export, retrieval, search, reports)
    "uit_jax.rundir",
    "uit_jax.export",
    "uit_jax.retrieval",
    "uit_jax.search",
    "uit_jax.report",
    "uit_jax.data.images",
    "uit_jax.compile_cache",
    "uit_jax.host_memory",
    "uit_jax.faults",
]
ABSENT = ["tensorflow", "tensorflow_datasets", "clu", "ml_collections", "torch"]


def test_train_step_modules_import_without_tensorflow_clu_ml_collections_or_torch():
    code = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in ABSENT)
    code += "".join(f"import {m}\n" for m in MODULES)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_the_benchmark_builds_its_state_without_tensorflow():
    """tools/benchmark.py (on accelerator images) runs a step with state.py's builders and none of the data stack."""
    code = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in ABSENT)
    code += "sys.path.insert(0, '.')\nfrom tools import benchmark\n"
    code += "benchmark.main(['--preset=tiny', '--image_size=32,16', '--text_len=8', '--batch=8', '--steps=1', "
    code += "'--num_classes=4', '--dtype=float32'])\n"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
