"""`dgrun analyze RUN features` takes penultimate features from every model the zoo ships,
the grokking preset's quadratic_mlp (raw parameters, no nn.Linear head) included."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from conftest import FAST, cli_here, read_summary, train_here
from dgrun import models
from dgrun.analysis.features import penultimate_features
from dgrun.models import MODELS

DATA = {"image": ((3, 32, 32), None), "vector": ((20,), None), "tokens": ((3,), 13)}


@pytest.mark.parametrize("name", MODELS.names())
def test_every_zoo_model_has_penultimate_features(name):
    modality = MODELS.tags(name).get("modalities", ("image", "vector"))[0]
    shape, vocab = DATA[modality]
    torch.manual_seed(0)
    model = models.create(name, shape, 5, modality, vocab_size=vocab)
    x = (torch.randint(0, vocab, (6, *shape)) if vocab else torch.randn(6, *shape))
    feats, logits = penultimate_features(model, x, return_logits=True)
    assert feats.shape[0] == 6 and feats.shape[1] > 1 and logits.shape == (6, 5)
    with torch.no_grad():
        assert torch.allclose(logits, model(x).float(), atol=1e-5)


def test_features_of_a_grokking_run(tmp_path, capsys):
    run_dir = tmp_path / "grok"
    train_here(run_dir, "phenomenon=grokking", "trainer.max_steps=60", "trainer.snapshots=log",
               *FAST)
    code, out, err = cli_here(capsys, "analyze", str(run_dir), "features", "num_checkpoints=3")
    assert code == 0, err
    probe = pd.read_csv(run_dir / "analysis" / "features" / "probe.csv")
    width = read_summary(run_dir)["config"]["model"]["width"]
    assert len(probe) == 3 and (probe["feature_dim"] == width).all()  # the hidden layer
    assert (run_dir / "analysis" / "features" / "linear_probe.png").exists()
