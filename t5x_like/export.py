"""The trained model written as a Hugging Face directory, from every process of a job."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import jax


def to_host(tree):
    """Numpy copies of every array in ``tree``, whole on every process (a multi-process
    array's other shards live on other hosts, which a plain device_get cannot read)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def export_model(task, state, model_config, tok_dir, out: Path) -> None:
    """Every process gathers the parameters; process 0 writes the directory."""
    from t5x_like.convert import hf

    params = to_host(jax.jit(task.export_params)(state.params))
    if jax.process_index() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            if tok_dir.is_file():  # a bare tokenizer file: the name transformers looks for
                name = "tokenizer.model" if tok_dir.suffix == ".model" else "tokenizer.json"
                shutil.copy(tok_dir, Path(tmp) / name)
                tok_dir = Path(tmp)
            hf.save_hf(model_config, params, out, tokenizer_dir=tok_dir)
        print(f"exported the trained model to {out}")
    if jax.process_count() > 1:  # the next stage of a recipe loads it on every process
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"export {out}")


