"""Every config composes and validates; the schema types what sweeps hand over."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from dgrun.cli import config_dir
from dgrun.config import from_hydra, register_schemas
from dgrun.data import DATASETS
from dgrun.data.corruption import PIXEL_CORRUPTIONS
from dgrun.errors import UserError
from dgrun.models import MODELS
from dgrun.objectives import OBJECTIVES
from dgrun.optim import OPTIMIZERS, SCHEDULERS

CONF = config_dir()


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def composer():
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda *overrides: compose("config", overrides=list(overrides))
    GlobalHydra.instance().clear()


def test_config_groups_and_registries_agree():
    """Every registered component has its config file, named after it; a further file is a
    preset of a registered one (conf/scheduler/zhang2017.yaml: `name: exponential`)."""
    import yaml

    for group, registry in [("dataset", DATASETS), ("model", MODELS),
                            ("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS),
                            ("objective", OBJECTIVES)]:
        names = {stem: yaml.safe_load((CONF / group / f"{stem}.yaml").read_text())["name"]
                 for stem in choices(group)}
        assert set(registry.names()) <= set(names), group
        assert all(names[n] == n for n in registry.names()), group
        assert set(names.values()) <= set(registry.names()), group
    assert choices("scheduler") == sorted([*SCHEDULERS.names(), "zhang2017"])


def test_every_choice_composes_and_validates_with_every_dataset(composer):
    """Every dataset composes with a model that takes its data, and every model's modality
    check holds for every dataset; each choice of the other groups composes with a dataset of
    each modality (the groups are independent of one another, so their product adds
    nothing); a phenomenon preset brings its own model, refused in one line on data it cannot
    take."""
    from dgrun.models import check_takes

    checked, by_modality = 0, {}
    for dataset in choices("dataset"):
        modality = DATASETS.tags(dataset)["modality"]
        takers = [m for m in choices("model") if modality in MODELS.tags(m)["modalities"]]
        for model in choices("model"):
            if model in takers:
                check_takes(model, modality)
            else:
                with pytest.raises(UserError, match="cannot take"):
                    check_takes(model, modality)
        run = from_hydra(composer(f"dataset={dataset}", f"model={takers[0]}"))
        assert (run.dataset.name, run.model.name) == (dataset, takers[0])
        by_modality.setdefault(modality, (dataset, takers[0]))
        checked += 1
    with pytest.raises(UserError, match="cannot take"):
        from_hydra(composer("dataset=mnist1d", "model=alexnet"))
    assert set(by_modality) == {"image", "vector", "tokens"}
    for modality, (dataset, model) in by_modality.items():
        for group in ("corruption", "optimizer", "scheduler", "objective", "model"):
            for choice in choices(group):
                overrides = [f"dataset={dataset}", f"model={model}", f"{group}={choice}"]
                if group == "model" and modality not in MODELS.tags(choice)["modalities"]:
                    continue
                if modality == "tokens" and choice in PIXEL_CORRUPTIONS:
                    with pytest.raises(UserError, match="needs image or vector data"):
                        from_hydra(composer(*overrides))
                else:
                    from_hydra(composer(*overrides))
                checked += 1
        for choice in choices("phenomenon"):
            cfg = composer(f"dataset={dataset}", f"phenomenon={choice}")
            if modality in MODELS.tags(cfg.model.name)["modalities"]:
                from_hydra(cfg)
            else:
                with pytest.raises(UserError, match="cannot take"):
                    from_hydra(cfg)
            checked += 1
    assert checked > 80


def test_logger_choices_are_the_registered_trackers(composer):
    from dgrun.trackers import TRACKERS

    assert sorted(set(choices("logger")) - {"none"}) == TRACKERS.names()
    run = from_hydra(composer("logger=[tensorboard,mlflow]", "logger.mlflow.experiment=x"))
    assert list(run.logger) == ["tensorboard", "mlflow"]
    assert run.logger["mlflow"]["experiment"] == "x"
    with pytest.raises(UserError, match="logger 'tensorboard' has no option 'colour'"):
        from_hydra(composer("logger=tensorboard", "+logger.tensorboard.colour=red"))


def test_experiments_and_phenomena_compose(composer):
    for name in choices("experiment"):
        from_hydra(composer(f"experiment={name}"))
    for name in choices("phenomenon"):
        from_hydra(composer(f"phenomenon={name}"))


@pytest.mark.parametrize("override,message", [
    ("+foo=bar", "unknown config key 'foo'"),
    ("+seeed=1", "unknown config key 'seeed'; did you mean seed?"),
    ("+trainer.max_stepz=3", "unknown config key 'trainer.max_stepz'; did you mean "
                             "trainer.max_steps?"),
    ("+corruption.probb=0.5", "unknown config key 'corruption.probb'; did you mean "
                              "corruption.prob?"),
    ("+phenomenon.notes=x", "unknown config key 'phenomenon.notes'"),
])
def test_keys_added_with_plus_are_checked_against_the_schema(composer, override, message):
    with pytest.raises(UserError, match=message.replace("?", r"\?")):
        from_hydra(composer(override))


def test_the_open_mappings_still_take_added_keys(composer):
    run = from_hydra(composer("+probes.transitions={}", "+logger.tensorboard={}",
                              "++model.dropout=0.1", "+trainer={}"))
    assert [p.name for p in run.probes] == ["transitions"] and "tensorboard" in run.logger
    assert run.model.options["dropout"] == 0.1


def test_schema_types_sweep_values(composer):
    run = from_hydra(composer("corruption=partial_labels", "corruption.prob=0"))
    assert isinstance(run.corruption.prob, float)
    run = from_hydra(composer("model.dropout=0"))
    assert isinstance(run.model.options["dropout"], float)


def test_mismatched_model_and_data_fail_before_loading(composer):
    with pytest.raises(UserError, match="cannot take vector data"):
        from_hydra(composer("dataset=mnist1d", "model=inception"))


def test_a_presets_schedule_is_replaced_whole_by_another_scheduler(composer):
    """phenomenon=rethinking's schedule (0.95 per 391 steps) is a scheduler choice of its own,
    so scheduler=constant replaces it rather than inheriting gamma and epoch_steps."""
    run = from_hydra(composer("phenomenon=rethinking"))
    assert run.scheduler.name == "exponential"
    assert run.scheduler.options == {"gamma": 0.95, "staircase": True, "warmup_steps": 0,
                                     "epoch_steps": 391}
    run = from_hydra(composer("phenomenon=rethinking", "scheduler=constant"))
    assert (run.scheduler.name, run.scheduler.options) == ("constant", {"warmup_steps": 0})
