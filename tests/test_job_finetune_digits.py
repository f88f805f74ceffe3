"""finetune_digits in one process: labelled split, loading an autoencoder (checkpoint and
MLflow registry), freezing, and the from-scratch reference's recipe."""

from __future__ import annotations

import math

import pytest
import torch

import jobs.finetune_digits as ft
from orchestrator.cli import compose_config
from orchestrator.context import LocalContext
from orchestrator.errors import UserError
from orchestrator.job import job_config, load_job
from orchestrator.loop import run

AE, FT = load_job("autoencoder_digits"), load_job("finetune_digits")


def jcfg(**values):
    return job_config(FT, {"name": "finetune_digits", **values})


@pytest.fixture(scope="module")
def ae_checkpoint(tmp_path_factory):
    """An autoencoder_digits checkpoint directory, as a real (1-epoch) run writes it."""
    path = tmp_path_factory.mktemp("ae")
    cfg = compose_config(["job=autoencoder_digits", "trainer.max_epochs=1"])
    assert run(cfg, LocalContext(checkpoint_dir=str(path))).status == "finished"
    return path


@pytest.fixture
def quick_reference(monkeypatch):
    monkeypatch.setitem(ft.SCRATCH, "epochs", 2)  # the full recipe takes seconds


def encoder_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.encoder.state_dict().items()}


def test_labelled_split_is_5_percent_stratified_fixed_and_from_the_training_split():
    splits = FT.build_data(jcfg())
    ae_splits = AE.build_data(job_config(AE, {"name": "autoencoder_digits"}))
    ae_train = ae_splits.train[:][0]
    x, y = splits.train[:]
    assert len(x) == 71 and set(torch.bincount(y).tolist()) == {7, 8}
    assert torch.equal(splits.val[:][0], ae_splits.val[:][0])  # the same 360 held-out images
    assert all((ae_train == img).all(dim=(1, 2, 3)).any() for img in x)  # no held-out image
    assert torch.equal(FT.build_data(jcfg()).train[:][0], x)
    assert not torch.equal(FT.build_data(jcfg(label_seed=1)).train[:][0], x)


def test_scratch_config_trains_to_a_finite_loss_with_the_reference(quick_reference):
    result = run(compose_config(["job=finetune_digits", "trainer.max_epochs=2"]), LocalContext())
    assert result.status == "finished" and math.isfinite(result.metrics["train/loss_epoch"])
    assert 0 <= result.metrics["val/acc"] <= 1


def test_reference_is_the_same_network_from_scratch_whatever_init_from(
    ae_checkpoint, quick_reference
):
    splits = FT.build_data(jcfg())
    plain = FT.references(jcfg(), splits)  # type: ignore[misc]
    assert FT.references(jcfg(init_from=str(ae_checkpoint)), splits) == plain  # type: ignore[misc]
    assert 0 < plain["scratch_acc"] < 1


def test_reference_recipe_matches_the_job_config():
    cfg = compose_config(["job=finetune_digits"])
    t = cfg["trainer"]
    assert ft.SCRATCH == {"epochs": t["max_epochs"], "batch": t["num_workers"] * t["batch_size"]}
    assert ft.SCRATCH_OPTIM == {k: cfg["optim"][k] for k in ft.SCRATCH_OPTIM}
    assert ft.SCRATCH_SCHED == cfg["sched"]
    assert (t["grad_accum_steps"], t["precision"]) == (1, "fp32")


def test_checkpoint_init_loads_the_encoder_and_freezing_keeps_it(ae_checkpoint):
    pretrained = AE.build_model(job_config(AE, {"name": "autoencoder_digits"}), None)
    pretrained.load_state_dict(torch.load(ae_checkpoint / "state.pt", weights_only=True)["model"])
    splits = FT.build_data(jcfg())
    for freeze in (True, False):
        model = FT.build_model(jcfg(init_from=str(ae_checkpoint), freeze_encoder=freeze), splits)
        loaded = encoder_state(model)
        assert all(torch.equal(v, pretrained.encoder.state_dict()[k]) for k, v in loaded.items())
        assert all(p.requires_grad != freeze for p in model.encoder.parameters())
    scratch = FT.build_model(jcfg(), splits)  # freeze_encoder=true only applies to init_from
    assert all(p.requires_grad for p in scratch.encoder.parameters())
    assert not torch.equal(scratch.encoder[1].weight, pretrained.encoder[1].weight)

    # A few optimizer steps as the loop takes them: a frozen encoder does not move.
    for freeze in (True, False):
        model = FT.build_model(jcfg(init_from=str(ae_checkpoint), freeze_encoder=freeze), splits)
        before = encoder_state(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        x, y = splits.train[:]
        model.train()
        for _ in range(3):
            opt.zero_grad()
            FT.training_step(model, (x, y)).backward()
            opt.step()
        changed = any(not torch.equal(v, model.encoder.state_dict()[k]) for k, v in before.items())
        assert changed != freeze


def test_bad_init_from_is_a_user_error(ae_checkpoint, tmp_path):
    splits = FT.build_data(jcfg())
    with pytest.raises(UserError, match="job.init_from.*relative"):
        FT.build_model(jcfg(init_from="outputs/ray/ckpt"), splits)
    with pytest.raises(UserError, match="job.init_from.*does not fit"):
        FT.build_model(jcfg(init_from=str(ae_checkpoint), latent_dim=4), splits)


def test_registered_mlflow_model_init(ae_checkpoint, tmp_path, monkeypatch):
    """The real path: the autoencoder logged and registered as the orchestrator does it, then
    loaded by `models:/name@alias` (MLflow 3 + torch.export: a GraphModule, not the class)."""
    from orchestrator import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # what the loop sets in every worker
    ae_cfg = job_config(AE, {"name": "autoencoder_digits"})
    ae = AE.build_model(ae_cfg, None)
    ae.load_state_dict(torch.load(ae_checkpoint / "state.pt", weights_only=True)["model"])
    client = tracking.client(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    example = AE.build_data(ae_cfg).val[:5][0]
    tracking.log_model_and_finish(uri, run_id, ae, example, "digits_ae", "champion")
    model = FT.build_model(jcfg(init_from="models:/digits_ae@champion"), FT.build_data(jcfg()))
    for k, v in encoder_state(model).items():
        assert torch.equal(v, ae.encoder.state_dict()[k]), k
