"""lm-evaluation-harness measures our model: the README's "Evaluate" commands, run as a user runs
them on the tiny preset's checkpoint and its Hugging Face export, give the same held-out
perplexity from the harness (transformers, the export's own code) and from the project
(`scripts/heldout_perplexity.py`, the Megatron model), to 1e-3 relative.

The harness reports word and byte perplexity (and bits per byte) for a loglikelihood_rolling
task; the project computes its loss per token over the same tokens, windows and prefix and
converts it with its own token, word and byte counts. Agreement therefore needs the same token
ids (the export's tokenizer.json against Megatron's SentencePiece tokenizer), the same windows
and the same logits (the HF model against Megatron's).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from user_runs import REPO, user_env

LIMIT = 6  # documents of the test split (lm_eval --limit)


def _readme_command(prefix: str) -> list[str]:
    from test_readme import COMMANDS

    (command,) = [c for c in COMMANDS if c.startswith(prefix)]
    return shlex.split(command)


def _offline_env() -> dict:
    """A user's shell without network: the tasks and the model are local."""
    return dict(user_env(), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", HF_HOME=os.environ.get("HF_HOME", ""))


@pytest.fixture(scope="module")
def evaluated(tiny_preset_run, tmp_path_factory):
    """(harness results for the ppl task, the project's numbers), both on LIMIT documents."""
    from megatron_dirmoe.convert.hf_export import convert_to_hf

    tmp = tmp_path_factory.mktemp("lm_eval")
    convert_to_hf(tiny_preset_run.checkpoint_dir, tmp / "hf_model")
    env = _offline_env()
    if not env["HF_HOME"]:
        env["HF_HOME"] = str(tmp / "hf_home")

    harness = _readme_command("lm_eval ")
    harness = [str(tmp / "hf_model") if a == "hf_model" else a for a in harness]
    harness = [a.replace("pretrained=hf_model", f"pretrained={tmp / 'hf_model'}") for a in harness]
    harness[0] = str(Path(sys.executable).parent / "lm_eval")
    harness += ["--limit", str(LIMIT), "--output_path", str(tmp / "results")]
    done = subprocess.run(harness, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (results_file,) = (tmp / "results").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]

    ours = _readme_command("python scripts/heldout_perplexity.py")
    ours = [str(tiny_preset_run.checkpoint_dir) if a == "<save_dir>" else a for a in ours]
    ours[0] = sys.executable
    ours += ["--limit", str(LIMIT), "--json", str(tmp / "ours.json")]
    done = subprocess.run(ours, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return results, json.loads((tmp / "ours.json").read_text()), done.stdout


def test_harness_perplexity_matches_the_projects_heldout_loss(evaluated):
    results, ours, _ = evaluated
    ppl = results["dirmoe_shakespeare_ppl"]
    assert ours["documents"] == LIMIT and ours["tokens"] > 1000
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        harness = ppl[f"{metric},none"]
        assert harness == pytest.approx(ours[metric], rel=1e-3), metric
    # The harness's bits per byte, converted back with the project's counts, is its loss per
    # token over the same tokens: the held-out loss the project reports.
    loss = ppl["bits_per_byte,none"] * math.log(2) * ours["bytes"] / ours["tokens"]
    assert loss == pytest.approx(ours["loss"], rel=1e-3)
    # A model after 3 training steps: far from uniform over 4096 ids is not expected, but the
    # numbers are real likelihoods (finite, above 1, below uniform).
    assert 1.0 < ours["token_perplexity"] < 4096 * 1.5


def test_multiple_choice_task_runs_on_the_export(evaluated):
    results, _, _ = evaluated
    next_line = results["dirmoe_shakespeare_next_line"]
    assert 0.0 <= next_line["acc,none"] <= 1.0 and 0.0 <= next_line["acc_norm,none"] <= 1.0


def test_rolling_windows_predict_every_token_once():
    from megatron_dirmoe.evaluation import rolling_windows

    ids = list(range(100, 123))  # 23 tokens, windows of 8: 8 + 8 + 7
    windows = rolling_windows(ids, prefix_id=1, window=8)
    assert [w.num_scored for w in windows] == [8, 8, 7]
    scored = [t for w in windows for t in w.target_ids[len(w.target_ids) - w.num_scored:]]
    assert scored == ids
    first, second, last = windows
    assert first.input_ids == (1, *ids[:7]) and first.target_ids == tuple(ids[:8])
    assert second.input_ids == tuple(ids[7:15])  # the token before the window, then within
    # The last, shorter window gets the longest context that fits.
    assert last.input_ids == tuple(ids[14:22]) and last.target_ids == tuple(ids[15:23])
    assert all(len(w.input_ids) == len(w.target_ids) <= 8 for w in windows)
    assert rolling_windows(ids[:3], 1, 8)[0].input_ids == (1, 100, 101)
