"""The README main job (MiniLM on SciFact) over learning rate x temperature: 4 points.

    python launch/sweep.py --sweep=configs/sweeps/minilm_lr.py --root=runs/minilm_lr --mode=local

Each point is one epoch (29 steps of 32) with evaluation before and after, about
10 minutes on a 2-core CPU; the corpus embeddings of the untrained model are cached
(eval.cache_dir), so the corpus is embedded for the untrained model only once.
"""

CONFIG = "configs/minilm_scifact.py"
FIXED = {}  # fields set for every point, e.g. {"train.epochs": 0.5}


def get_sweep():
    # the shipped setting is 3e-5 and 0.05 (scale 20, as all-MiniLM-L6-v2 was trained)
    return {
        "optimizer.learning_rate": [3e-5, 1e-4],
        "objective.temperature": [0.02, 0.05],
    }
