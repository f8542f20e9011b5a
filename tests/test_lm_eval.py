"""lm-evaluation-harness on --export-hf's folder, offline, on a local task in HellaSwag's
format rendered as hellaswag.py renders it: every ending's log-likelihood is our model's,
and lm-eval's acc is hellaswag.py's."""
import glob
import json
import os

import pytest
import torch

import checkpoint
import hellaswag
import train_gpt2
from conftest import EXAMPLES, run, write_jsonl
from tokenizer import GPT2_VOCAB

# the context, then " " + the ending (lm-eval's default target_delimiter), scored by the
# summed log-likelihood of the ending's tokens: what hellaswag.py's acc counts
TASK = """task: hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {jsonl}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{ctx}}}}"
doc_to_target: label
doc_to_choice: endings
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_lm_eval_scores_the_export_as_we_do(tmp_path):
    pytest.importorskip("lm_eval")
    torch.manual_seed(0)
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=64, vocab_size=50304, n_layer=2,
                                                n_head=2, n_embd=64)).eval()
    checkpoint.export_hf(model, str(tmp_path / "hf"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    jsonl = write_jsonl(tmp_path / "examples.jsonl", EXAMPLES)
    (tasks / "hellaswag_local.yaml").write_text(TASK.format(jsonl=jsonl))
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_DATASETS_CACHE=str(tmp_path / "datasets_cache"))
    run(["-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tmp_path / 'hf'}",
         "--tasks", "hellaswag_local", "--include_path", str(tasks), "--device", "cpu",
         "--batch_size", "8", "--log_samples", "--output_path", str(tmp_path / "out")],
        env=env, timeout=600)
    [results] = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
    [samples] = glob.glob(str(tmp_path / "out" / "**" / "samples_hellaswag_local_*.jsonl"),
                          recursive=True)
    with open(results) as f:
        theirs_acc = json.load(f)["results"]["hellaswag_local"]["acc,none"]
    with open(samples) as f:
        rows = sorted((json.loads(line) for line in f), key=lambda row: row["doc_id"])
    # each ending's (log-likelihood, is greedy), written as text
    theirs = torch.tensor([[float(resp[0]) for resp in row["filtered_resps"]] for row in rows])

    # ours, on the model's own logits with the padded rows dropped, as the export drops them
    def logits(idx):
        return model(idx)[0][..., :GPT2_VOCAB]
    with torch.no_grad():
        predictions = hellaswag.predict(logits, EXAMPLES, device="cpu")
        ours_acc = hellaswag.evaluate(logits, EXAMPLES, device="cpu").acc
    ours = -torch.tensor([p.sum_loss for p in predictions])  # (N, 4) log-likelihoods
    assert theirs.shape == (len(EXAMPLES), 4)
    torch.testing.assert_close(theirs.double(), ours.double(), atol=2e-5, rtol=0)
    # the same verdict on every example, so the same acc
    assert [row["acc"] for row in rows] == [float(p.pred == p.label) for p in predictions]
    assert theirs_acc == ours_acc
