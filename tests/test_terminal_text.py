"""What dgrun says on the terminal: a run's closing lines carry its phenomenon's numbers,
`dgrun list` prints every description whole, `dgrun analyze` says what it needs."""
from __future__ import annotations

import re

from conftest import FAST, cli_here, dgrun, read_summary
from dgrun.catalog import first_sentence
from dgrun.probes.closing import closing_lines


def test_a_grokking_run_ends_with_its_memorization_and_generalization_steps(tmp_path):
    run_dir = tmp_path / "grok"
    proc = dgrun("phenomenon=grokking", f"hydra.run.dir={run_dir}", *FAST)
    found = read_summary(run_dir)["grokking"]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("grokking:"))
    assert (f"memorized at step {found['memorization_step']} " in line
            and f"generalized at step {found['generalization_step']} " in line
            and f"{found['delay_ratio']:.1f}x later (grokked)" in line), line
    assert re.search(r"^transitions: test_acc 0\.\d\d -> 0\.9\d at step \d+", proc.stdout, re.M)


def test_each_phenomenon_says_its_numbers():
    summary = {
        "final": {"test_acc": 0.88, "train_acc_corrupted": 1.0, "train_acc_clean": 1.0,
                  "test_acc_y_0_color_red": 1.0, "test_acc_y_1_color_red": 0.72},
        "corruption": {"name": "random_labels", "prob": 1.0},
        "groups": {"worst_group_catch_up_step": 891, "gap": 0.05, "final_worst_group_acc": 0.72,
                   "final_avg_acc": 0.88, "max_gap": 0.53, "max_gap_step": 3},
        "robustness": {"measured_step": 1200, "corruption_acc": 0.91, "corruption_acc_best": 0.92,
                       "corruption_acc_best_step": 100, "corruption_acc_fog": 0.89,
                       "corruption_acc_glass_blur": 0.49, "adv_acc": 0.3, "adv_acc_best": 0.5,
                       "adv_acc_best_step": 564},
        "transitions": {"events": [{"metric": "log10_train_loss", "step": 1750, "before": 0.0,
                                    "after": -4.0}]},
        "config": {"probes": {"robustness": {"attack": "pgd", "eps": 8 / 255}}},
    }
    assert closing_lines(summary) == [
        "random_labels (p=1): train acc on corrupted rows 1.00, on clean rows 1.00; test acc 0.88",
        "worst group (y_1_color_red): 0.72 vs average 0.88 at the end; widest gap 0.53 at step 3;"
        " caught up (within 0.05 of average) at step 891",
        "robustness at step 1200: corruption acc 0.91 (weakest: glass_blur 0.49); PGD acc at eps "
        "8/255 0.30 (best 0.50 at step 564)",
        "transitions: train_loss 1 -> 0.0001 at step 1750",
    ]
    assert closing_lines({"final": {}, "corruption": {"name": "none"}}) == []


def test_list_prints_descriptions_whole(capsys):
    code, out, _ = cli_here(capsys, "list")
    assert code == 0
    flat = " ".join(out.split())
    # Square brackets are text, not rich markup.
    assert "pip install 'dgrun[mlflow]'" in flat and "pip install 'dgrun[tensorboard]'" in flat
    assert 'tokens [x, y, "="] (vocab p+1)' in flat
    # "et al." and brackets do not end a sentence.
    assert "MLP 1x512 (Zhang et al. Table 1): 1,209,866 parameters" in flat
    # Every choice says what it is: the optimizer table is not empty.
    for name in ("sgd", "adam", "adamw"):
        row = next(line for line in out.splitlines() if re.match(rf"\W*{name}\W", line))
        assert len(row.replace("│", "").split()) > 3, row


def test_first_sentence_stops_at_a_real_full_stop_only():
    assert first_sentence(["Zhang et al. 2017. Then more."]) == "Zhang et al. 2017"
    assert first_sentence(["A (b. C) d. E f."]) == "A (b. C) d"
    assert first_sentence(["e.g. Foo bar. Baz."]) == "e.g. Foo bar"


def test_analyze_without_arguments_names_what_it_needs(capsys):
    code, out, err = cli_here(capsys, "analyze")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "needs RUN_DIR and WHAT" in err and "cartography" in err
    assert "OPTION=VALUE" not in err.split(";")[0] and "required" not in err
    code, _, err = cli_here(capsys, "analyze", "somewhere")
    assert code == 2 and "needs WHAT" in err
