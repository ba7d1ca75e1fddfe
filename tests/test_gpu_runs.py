"""What a GPU user hits with real checkpoints at dataset scale, simulated on the CPU (CUDA, SLURM and the hub are
monkeypatched): the SDXL-class checkpoints Peekaboo still cannot drive refused from their configs, more workers
than GPUs, the prompt-embedding cache, the TF32 switch, ``sbatch --ntasks`` without ``srun``, logger runs for a
sample of pairs, and loading with accelerate."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil

import huggingface_hub
import pytest
import torch
from tests_support import FAST, REPO_CONFIGS

from peekaboo.config import ModelConfig, TrainConfig, load_config
from peekaboo.diffusion import prompts as prompts_module
from peekaboo.diffusion.backbone import Backbone
from peekaboo.diffusion.checks import check_model_source
from peekaboo.diffusion.loading import load_backbone, shared_backbone
from peekaboo.errors import ConfigError, ModelError
from peekaboo.runs import runner
from peekaboo.runs.workers import World

SDXL_ID = "stabilityai/stable-diffusion-xl-base-1.0"
SLURM_KEYS = ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_JOB_ID",
              "WORLD_SIZE", "RANK", "LOCAL_RANK")


def _train_cfg(model, root, *args: str) -> TrainConfig:
    args = (f"model.pretrained={model}", f"run.root={root}", "run.name=g", *FAST, "data=shapes", "data.num_pairs=3",
            "data.pairs_per_step=1", "run.logger=none", *args)
    return load_config(TrainConfig, list(args), REPO_CONFIGS, "train")


# -- SDXL-class checkpoints: what is still refused, from the configs, before any weights ------------------------
def _pipeline_copy(model, tmp_path, unet: dict | None = None, class_name: str | None = None,
                   index: dict | None = None):
    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    index = {**(index or {}), **({"_class_name": class_name} if class_name else {})}
    for file, edits in ((folder / "unet" / "config.json", unet), (folder / "model_index.json", index)):
        if edits:
            file.write_text(json.dumps({**json.loads(file.read_text()), **edits}))
    return folder


class FakeHub:
    """``hf_hub_download`` over a local pipeline folder; recording each call and failing on any weights file."""

    def __init__(self, folder):
        self.folder, self.calls = folder, []

    def __call__(self, repo_id, filename, *, subfolder=None, revision=None, local_files_only=False, **kwargs):
        path = f"{subfolder}/{filename}" if subfolder else filename
        self.calls.append({"repo": repo_id, "file": path, "revision": revision, "offline": local_files_only})
        assert path.endswith(".json"), f"weights requested: {path}"
        return str(self.folder / path)


@pytest.fixture
def no_weights(monkeypatch):
    """Any weights load fails the test: a refusal must come from the configs alone."""
    import diffusers
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("weights requested")

    for cls in (diffusers.AutoencoderKL, diffusers.UNet2DConditionModel, transformers.CLIPTextModel,
                transformers.CLIPTextModelWithProjection):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


#: SDXL's refiner as its model_index.json lists it: no first text encoder, time ids with an aesthetic score.
REFINER_INDEX = {"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None],
                 "tokenizer": [None, None], "requires_aesthetics_score": True, "force_zeros_for_empty_prompt": False}
#: A refiner-style UNet: five time ids (an aesthetic score in place of the target size) of width 8, pooled 24.
REFINER_UNET = {"projection_class_embeddings_input_dim": 5 * 8 + 24}

STILL_REFUSED = {  # name -> (base model, edits, what the one-line refusal says)
    "refiner-only": ("sdxl", {"index": REFINER_INDEX}, r"without text_encoder, tokenizer \(an SDXL refiner-only"),
    "aesthetic score": ("sdxl", {"index": {"requires_aesthetics_score": True}},
                        r"conditioned on an aesthetic score \(requires_aesthetics_score"),
    "refiner time ids": ("sdxl", {"unet": REFINER_UNET},
                         r"added embedding takes 64 values, not 6 time ids x addition_time_embed_dim 8 \+ "
                         r"text_encoder_2's projection_dim 24"),
    "text_time without text_encoder_2": ("sd", {"unet": {"addition_embed_type": "text_time"}},
                                         r"addition_embed_type='text_time'\), but it has no text_encoder_2, "
                                         r"tokenizer_2"),
    "other added conditioning": ("sd", {"unet": {"addition_embed_type": "text_image"}},
                                 r"addition_embed_type='text_image'; it gives none, as SD 1.x/2.x, or 'text_time'"),
}


@pytest.mark.parametrize("case", list(STILL_REFUSED))
def test_what_sdxl_support_does_not_cover_is_refused_from_local_configs(tiny_model, tiny_sdxl_model, tmp_path,
                                                                       no_weights, case):
    base, edits, message = STILL_REFUSED[case]
    folder = _pipeline_copy(tiny_sdxl_model if base == "sdxl" else tiny_model, tmp_path, **edits)
    with pytest.raises(ModelError, match=message) as err:
        load_backbone(ModelConfig(pretrained=str(folder)))
    assert "\n" not in str(err.value)


def test_an_sdxl_pipeline_class_is_no_longer_refused_by_name(tiny_model, tmp_path, no_weights):
    folder = _pipeline_copy(tiny_model, tmp_path, class_name="StableDiffusionXLPipeline")  # an SD layout underneath
    assert check_model_source(ModelConfig(pretrained=str(folder)), segmentation=True) == str(folder)


@pytest.mark.parametrize("offline", ["env", "config", "online"])
def test_an_sdxl_hub_id_passes_the_check_from_its_small_files(tiny_sdxl_model, monkeypatch, no_weights,
                                                                     offline):
    hub = FakeHub(tiny_sdxl_model)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if offline == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(pretrained=SDXL_ID, revision="v1", local_files_only=offline == "config")
    assert check_model_source(cfg, "cpu", segmentation=True) == SDXL_ID
    assert [c["file"] for c in hub.calls] == ["model_index.json", "unet/config.json", "text_encoder_2/config.json",
                                              "vae/config.json", "scheduler/scheduler_config.json"]
    assert all(c["repo"] == SDXL_ID and c["revision"] == "v1" and c["offline"] == (offline != "online")
               for c in hub.calls)


def test_an_sdxl_refiner_on_the_hub_is_refused_from_model_index_alone(tiny_sdxl_model, tmp_path, monkeypatch,
                                                                      no_weights):
    hub = FakeHub(_pipeline_copy(tiny_sdxl_model, tmp_path, index=REFINER_INDEX))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    with pytest.raises(ModelError, match=r"StableDiffusionXLImg2ImgPipeline without text_encoder.*refiner-only"):
        load_backbone(ModelConfig(pretrained="stabilityai/stable-diffusion-xl-refiner-1.0"))
    assert [c["file"] for c in hub.calls] == ["model_index.json"]


@pytest.mark.parametrize("unet,message", [(REFINER_UNET, "added embedding takes 64 values"),
                                          ({"addition_embed_type": "image"}, "addition_embed_type='image'")])
def test_an_sdxl_hub_id_whose_unet_cannot_be_conditioned_is_refused_before_any_weights(
        tiny_sdxl_model, tmp_path, monkeypatch, no_weights, unet, message):
    hub = FakeHub(_pipeline_copy(tiny_sdxl_model, tmp_path, unet=unet))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    with pytest.raises(ModelError, match=message) as err:
        load_backbone(ModelConfig(pretrained=SDXL_ID))
    assert "\n" not in str(err.value)
    assert all(c["file"].endswith(".json") for c in hub.calls)


def test_an_sd_hub_id_passes_the_check_from_its_small_files(tiny_model, monkeypatch, no_weights):
    hub = FakeHub(tiny_model)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    assert check_model_source(ModelConfig(pretrained="owner/sd-like"), "cpu", segmentation=True) == "owner/sd-like"
    assert [c["file"] for c in hub.calls] == ["model_index.json", "unet/config.json", "vae/config.json",
                                              "scheduler/scheduler_config.json"]


@pytest.mark.parametrize("component,file,edits,message", [
    ("scheduler", "scheduler_config.json", {"prediction_type": "sample"}, "the scheduler predicts 'sample'"),
    ("vae", "config.json", {"latent_channels": 8}, "takes 4 input channels but its VAE makes 8-channel latents"),
])
def test_a_hub_id_whose_scheduler_or_vae_peekaboo_cannot_use_is_refused_before_any_weights(
        tiny_model, tmp_path, monkeypatch, no_weights, component, file, edits, message):
    folder = _pipeline_copy(tiny_model, tmp_path)
    config = folder / component / file
    config.write_text(json.dumps({**json.loads(config.read_text()), **edits}))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", FakeHub(folder))
    with pytest.raises(ModelError, match=message) as err:
        check_model_source(ModelConfig(pretrained="owner/sd-like"), "cpu", segmentation=True)
    assert "\n" not in str(err.value)


def test_a_hub_id_missing_from_the_offline_cache_is_one_line(monkeypatch):
    from huggingface_hub.utils import LocalEntryNotFoundError

    def missing(*args, **kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache.")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing)
    with pytest.raises(ModelError, match=r"model_index\.json.*local Hugging Face cache.*HF_HUB_OFFLINE") as err:
        check_model_source(ModelConfig(pretrained=SDXL_ID, local_files_only=True))
    assert "\n" not in str(err.value)


# -- more workers than visible GPUs ------------------------------------------------------------------------------
@pytest.fixture
def two_gpus(monkeypatch):
    """Two visible CUDA devices, as far as device selection can tell; no worker is really started."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for key in SLURM_KEYS:
        monkeypatch.delenv(key, raising=False)
    spawned: list[int] = []
    monkeypatch.setattr(runner, "spawn_workers", lambda cfg, names: spawned.append(cfg.trainer.devices) or 0)
    return spawned


@pytest.mark.parametrize("accelerator", ["gpu", "auto"])
def test_more_workers_than_visible_gpus_is_refused_before_any_work(tiny_model, tmp_path, two_gpus, accelerator):
    cfg = _train_cfg(tiny_model, tmp_path, f"trainer.accelerator={accelerator}", "trainer.devices=3")
    with pytest.raises(ConfigError, match=r"trainer\.devices=3 .* 2 GPUs are visible.*trainer\.devices=2") as err:
        runner.run(cfg)
    assert "\n" not in str(err.value) and not two_gpus and not (tmp_path / "g").exists()
    runner.run(_train_cfg(tiny_model, tmp_path, f"trainer.accelerator={accelerator}", "trainer.devices=2"))
    assert two_gpus == [2]  # one worker per GPU starts


def test_cpu_workers_are_not_limited_by_gpus(tiny_model, tmp_path, two_gpus):
    runner.run(_train_cfg(tiny_model, tmp_path, "trainer.accelerator=cpu", "trainer.devices=3"))
    assert two_gpus == [3]


# -- the prompt-embedding cache ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_the_prompt_cache_stays_bounded_and_returns_the_same_embeddings(tiny_model, tiny_sdxl_model, monkeypatch,
                                                                         kind):
    monkeypatch.setattr(prompts_module, "PROMPT_CACHE_SIZE", 4)
    backbone = load_backbone(ModelConfig(pretrained=str(tiny_sdxl_model if kind == "sdxl" else tiny_model)))
    words = ["red", "green", "blue", "cat", "dog", "hat", "circle", "square"]
    first = {w: backbone.encode_prompt(f"a {w}") for w in words}
    assert len(backbone.prompt_encoder.cache) <= 4
    assert "" in backbone.prompt_encoder.cache  # the empty prompt is used with every prompt: it is never the oldest
    for w in words:  # evicted or not, a prompt gets the same embeddings (SDXL: the pooled ones too)
        again = backbone.encode_prompt(f"a {w}")
        assert torch.equal(again.cond, first[w].cond) and torch.equal(again.uncond, first[w].uncond)
        if kind == "sdxl":
            assert torch.equal(again.pooled_cond, first[w].pooled_cond)
            assert torch.equal(again.pooled_uncond, first[w].pooled_uncond)
        else:
            assert again.pooled_cond is None and again.pooled_uncond is None
    assert len(backbone.prompt_encoder.cache) <= 4


# -- TF32 ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def restore_precision():
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


def test_tf32_is_on_by_default():
    assert ModelConfig().tf32 is True
    cfg = load_config(TrainConfig, ["run.name=x", "model.tf32=false"], REPO_CONFIGS, "train")
    assert cfg.model.tf32 is False


@pytest.mark.parametrize("tf32", [True, False])
def test_the_tf32_switch_sets_float32_matmul_precision_on_a_gpu(tiny_model, monkeypatch, restore_precision, tf32):
    monkeypatch.setattr(Backbone, "to", lambda self, device: self)  # no CUDA here: the weights stay on the CPU
    torch.set_float32_matmul_precision("medium")  # neither value the switch sets
    torch.backends.cudnn.allow_tf32 = not tf32
    shared_backbone(ModelConfig(pretrained=str(tiny_model), tf32=tf32), torch.device("cuda", 0))
    assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
    assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32


def test_the_tf32_switch_does_nothing_on_cpu(tiny_model, restore_precision):
    torch.set_float32_matmul_precision("highest")
    shared_backbone(ModelConfig(pretrained=str(tiny_model), tf32=True), "cpu")
    assert torch.get_float32_matmul_precision() == "highest"


# -- sbatch --ntasks=N without srun ----------------------------------------------------------------------------------
def _slurm_batch_env(monkeypatch, srun: bool) -> None:
    for key in SLURM_KEYS:
        monkeypatch.delenv(key, raising=False)
    for key, value in {"SLURM_NTASKS": "3", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "42"}.items():
        monkeypatch.setenv(key, value)
    if srun:
        monkeypatch.setenv("SLURM_STEP_ID", "0")


def test_sbatch_ntasks_without_srun_runs_every_pair_and_names_srun(tiny_model, tmp_path, monkeypatch, caplog):
    _slurm_batch_env(monkeypatch, srun=False)
    caplog.set_level(logging.WARNING)
    outcome = runner.run(_train_cfg(tiny_model, tmp_path))
    assert outcome.status == 0
    assert outcome.summary["done"] == 3 and outcome.summary["remaining"] == 0
    assert "SLURM_NTASKS=3" in caplog.text and "srun" in caplog.text


def test_srun_tasks_share_the_pairs(monkeypatch):
    _slurm_batch_env(monkeypatch, srun=True)
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert World.from_env() == World(rank=2, size=3, local_rank=0)


# -- logging at dataset scale: logger runs for a sample of pairs, job-level aggregates for all ------------------------
def _scalars(run) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("pairs_per_step", [1, 2])
def test_only_a_sample_of_pairs_gets_logger_runs_and_the_job_gets_aggregates(tiny_model, tmp_path, pairs_per_step):
    cfg = _train_cfg(tiny_model, tmp_path, "run.logger=tensorboard", "run.log_pairs=2", "data.num_pairs=5",
                     f"data.pairs_per_step={pairs_per_step}", "trainer.max_steps=4", "trainer.log_every_n_steps=2")
    outcome = runner.run(cfg)
    assert outcome.summary["done"] == 5
    names = [json.loads(line)["name"] for line in (outcome.root / "results.jsonl").read_text().splitlines()]
    # The sample: the pairs whose name hashes lowest, whatever the batching or the number of workers.
    sample = set(sorted(names, key=lambda n: hashlib.sha1(n.encode()).hexdigest())[:2])
    runs = {p.name for p in (outcome.root / "tb").iterdir()}
    assert runs & set(names) == sample
    # The job's runs, and with batches the sampled pairs' batch means (they are batched together).
    assert len(runs - sample - {"worker0", "worker0-losses"}) == (pairs_per_step > 1)
    job = _scalars(outcome.root / "tb" / "worker0")
    assert [s for s, _ in job["job/pairs_done"]] == [1, 2, 3, 4, 5]
    for tag in ("job/mask_area", "job/pairs_per_hour", "job/loss_q10", "job/loss_q50", "job/loss_q90"):
        assert len(job[tag]) == 5, tag
    losses = _scalars(outcome.root / "tb" / "worker0-losses")
    for term in ("total", "dream", "alpha"):
        low, mid, high = (dict(losses[f"loss_quantiles/{term}_q{q}"]) for q in (10, 50, 90))
        assert sorted(mid) == [1, 2, 3, 4]  # every optimization step the pairs' curves hold
        assert all(low[s] <= mid[s] <= high[s] for s in mid)


# -- accelerate ------------------------------------------------------------------------------------------------------
def _loading_messages(model) -> list[str]:
    """What diffusers logs at WARNING while the backbone loads."""
    import diffusers

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    lib, handler = diffusers.utils.logging, Collect(logging.WARNING)
    verbosity = lib.get_verbosity()
    lib.set_verbosity_warning()
    logging.getLogger("diffusers").addHandler(handler)
    try:
        load_backbone(ModelConfig(pretrained=str(model)))
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
        lib.set_verbosity(verbosity)
    return messages


def test_loading_has_accelerate_so_diffusers_does_not_warn_about_low_memory_loading(tiny_model):
    assert importlib.util.find_spec("accelerate") is not None  # a dependency (pyproject.toml)
    assert not [m for m in _loading_messages(tiny_model) if "accelerate" in m]


def test_without_accelerate_the_low_memory_warning_would_show(tiny_model, monkeypatch):
    # The check above is not vacuous: as if accelerate were missing, diffusers says so while loading.
    from diffusers.models import modeling_utils

    monkeypatch.setattr(modeling_utils, "is_accelerate_available", lambda: False)
    assert any("low cpu memory usage because `accelerate` was not found" in m
               for m in _loading_messages(tiny_model))


# -- the same on a real GPU (skipped without CUDA) -------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [True, False])
def test_gpu_tf32_switch_and_a_fit_under_it(tiny_model, restore_precision, tf32):
    from tests_support import cpu_trainer_config, small_optimization_config

    from peekaboo.optim.engine import optimize_pair

    backbone = shared_backbone(ModelConfig(pretrained=str(tiny_model), tf32=tf32), "cuda")
    assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
    assert torch.backends.cudnn.allow_tf32 is tf32
    # Lightning reads the matmul precision when a Trainer starts on a GPU: the switch must leave it readable.
    trainer = cpu_trainer_config(steps=2)
    trainer.accelerator = "gpu"
    result = optimize_pair(torch.rand(3, 16, 16), "a red circle", "p", small_optimization_config(), trainer, backbone)
    assert result.steps == 2 and torch.isfinite(result.alpha).all()


@pytest.mark.gpu
def test_gpu_more_workers_than_gpus_is_refused(tiny_model, tmp_path, monkeypatch):
    for key in SLURM_KEYS:
        monkeypatch.delenv(key, raising=False)
    n = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=rf"trainer\.devices={n + 1} .*trainer\.devices={n}"):
        runner.run(_train_cfg(tiny_model, tmp_path, "trainer.accelerator=gpu", f"trainer.devices={n + 1}"))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_gpu_prompt_cache_lives_on_the_device_and_stays_bounded(tiny_model, tiny_sdxl_model, monkeypatch, kind):
    monkeypatch.setattr(prompts_module, "PROMPT_CACHE_SIZE", 3)
    backbone = load_backbone(ModelConfig(pretrained=str(tiny_sdxl_model if kind == "sdxl" else tiny_model)), "cuda")
    first = {w: backbone.encode_prompt(f"a {w}").cond for w in ("red", "green", "blue", "cat", "dog")}
    assert len(backbone.prompt_encoder.cache) <= 3
    cached = [t for hidden, pooled in backbone.prompt_encoder.cache.values() for t in (hidden, pooled) if t is not None]
    assert len(cached) == len(backbone.prompt_encoder.cache) * (2 if kind == "sdxl" else 1)
    assert all(t.device.type == "cuda" for t in cached)
    for w, cond in first.items():
        assert torch.allclose(backbone.encode_prompt(f"a {w}").cond, cond)
