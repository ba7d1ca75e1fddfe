"""The configuration's schema: typed dataclasses holding every key and its default, and the allowed values.

A default lives here and nowhere else. The defaults are the paper's settings for Stable Diffusion 1.x
(docs/DESIGN.md, which lists where they depart from the official code); the YAML presets only override them
(:mod:`peekaboo.config.overrides`), and :mod:`peekaboo.config.validation` range-checks the result against the
tuples of allowed values below.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from peekaboo.utils.images import DEFAULT_MAX_PIXELS

MASK_KINDS = ("raster", "fourier", "raster_bilateral", "fourier_bilateral")
BACKGROUNDS = ("solid", "noise", "blur")
FIT_MODES = ("scale", "crop", "pad")
OPTIMIZERS = ("sgd", "adam", "adamw")
DTYPES = ("float32", "float16", "bfloat16")
# "sdpa": torch's fused scaled_dot_product_attention (diffusers' default on torch 2); "classic": diffusers'
# AttnProcessor (explicit matmul + softmax), for comparison and for backends where SDPA misbehaves.
ATTENTIONS = ("sdpa", "classic")
# Not 16-mixed: float16 autocast needs a GradScaler, and Lightning's one scaler would be shared by every pair of a
# batch (config/validation.py says so to whoever asks for it).
PRECISIONS = ("32-true", "32", "bf16-mixed")
GRAVITY_REDUCTIONS = ("sum", "mean")
LATENT_MODES = ("mean", "sample")
COMPOSITES = ("pixel", "latent")
# optimization.optim.schedule: the learning rate over a pair's steps (peekaboo.optim.optimizer.lr_factor).
LR_SCHEDULES = ("constant", "cosine", "step")
# optimization.guidance.t_schedule: where each step's dream-loss timestep comes from (peekaboo.ops.timestep_range).
T_SCHEDULES = ("uniform", "annealed", "stratified")
# optimization.guidance.estimator: how the UNet's predictions make the dream-loss gradient
# (peekaboo.diffusion.estimators). dds was retired: it lost to sds in every measurement.
ESTIMATORS = ("sds", "nfsd", "full")
# optimization.guidance.noise: where the noisy latents come from, a fresh draw. ddim_inversion was retired: it
# lost to random noise in every measurement.
NOISE_KINDS = ("random",)
# optimization.mask.init: where the mask starts (peekaboo.optim.module.PeekabooModule.on_fit_start).
MASK_INITS = ("constant", "cross_attention", "region")
# How restarts score a candidate: the denoising error under the prompt, that error over the error without it, or
# the guided denoising objective (RestartsConfig.fit).
RESTART_FITS = ("error", "error_ratio", "objective")
# optimization.mask.size: the largest mask side allowed.
MAX_MASK_SIZE = 4096
# run.logger values: Lightning's loggers (peekaboo.optim.loggers builds them), or none.
LOGGERS = ("tensorboard", "csv", "wandb", "mlflow", "none")
# Loggers whose package is an optional extra of this project: logger -> (module, pip extra).
OPTIONAL_LOGGERS = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
# data.source values (peekaboo.data builds each).
DATA_SOURCES = ("manifest", "objects", "shapes", "voc", "refcoco", "folder")
# model.pretrained names of the small models shipped inside the package, each with its folder under
# peekaboo/assets/ and the model preset (configs/model/<preset>.yaml) tuned for it. "bundled" is the everyday-objects
# model (the default everywhere); "bundled-shapes" the flat-coloured shapes model the fastest tests use.
BUNDLED_MODEL = "bundled"
BUNDLED_SHAPES_MODEL = "bundled-shapes"
BUNDLED_MODELS: dict[str, tuple[str, str]] = {BUNDLED_MODEL: ("objects-ldm", "objects"),
                                              BUNDLED_SHAPES_MODEL: ("shapes-ldm", "shapes")}


@dataclass
class ModelConfig:
    """The frozen text-to-image diffusion model (diffusers Stable-Diffusion layout)."""

    # "bundled" (the everyday-objects model shipped in the package), "bundled-shapes", a hub id, or a local folder.
    pretrained: str = BUNDLED_MODEL
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" to load a checkpoint's half-precision weight files
    dtype: str = "float32"  # weights of the frozen model; the mask always stays float32
    # Forces offline loading; HF_HUB_OFFLINE=1 in the environment does the same.
    local_files_only: bool = False
    channels_last: bool = False
    compile: bool = False  # torch.compile the UNet and the VAE encoder (pays off on GPUs for long runs)
    attention: str = "sdpa"  # the UNet's and VAE's attention kernels: sdpa | classic
    # Recompute the VAE encoder's activations in the backward pass instead of keeping them: less memory per pair
    # (more pairs per step on a GPU) for one more encoder forward per step; docs/PERFORMANCE.md has both.
    vae_gradient_checkpointing: bool = False
    # On a GPU with TF32 tensor cores (Ampere and later), let float32 matmuls and convolutions use them: several
    # times the float32 throughput, at TF32's 10-bit mantissa (float16 and bfloat16 weights are unaffected). It
    # is torch's process-wide switch, set where the model is set up on the GPU (predict, the Segmenter, each
    # worker of a dataset run); false keeps full float32. No effect on CPU.
    tf32: bool = True
    # Side length the composite is resized to before VAE encoding; None = the model's native
    # resolution (unet.sample_size * VAE downsampling factor: 512 for SD 1.x).
    resolution: int | None = None


@dataclass
class GuidanceConfig:
    """The dream loss (score distillation), DESIGN.md step 5."""

    guidance_scale: float = 100.0
    t_min: float = 0.02  # fraction of the training timesteps
    t_max: float = 0.98
    # Encode the composite with the VAE posterior mean or a sample from it (the paper samples).
    latent_mode: str = "sample"
    # Run [uncond, cond] as one UNet batch of 2B (faster) or as two calls (less memory).
    batch_cfg: bool = True
    # uniform: t ~ U[t_min, t_max] every step (the paper); annealed: t falls linearly from t_max to t_min over
    # the run, drawn within +-t_anneal_jitter of that line (after DreamTime, arXiv:2306.12422); stratified:
    # the steps cycle through t_strata equal slices of [t_min, t_max], one draw in each.
    t_schedule: str = "uniform"
    t_anneal_jitter: float = 0.05  # annealed: half-width of the band around the line, in the units of t_min
    t_strata: int = 8  # stratified: how many slices of [t_min, t_max] a cycle visits
    # Timestep/noise draws per step for the same composite, in one UNet batch of B*K (2B*K with batch_cfg);
    # the gradient is their mean (a lower-variance estimate at K times the UNet cost).
    samples_per_step: int = 1
    # The gradient from the predictions (UNet rows per draw: 2 with batch_cfg). sds: w (eps_hat - eps), the
    # paper's; nfsd: Noise-Free Score Distillation (arXiv:2310.17590), w (delta_D + s delta_C), no noise term
    # (meant for ordinary guidance scales such as 7.5); full: the gradient of the objective sds approximates,
    # through the UNet (its Jacobian, which sds drops), at the cost of a backward pass through the UNet.
    estimator: str = "sds"
    # nfsd: delta_D is eps_u below this fraction of the training timesteps, eps_u - eps_neg above it.
    nfsd_t_threshold: float = 0.2
    # nfsd: the negative prompt of eps_neg; "" makes eps_neg = eps_u (no extra rows), another adds a row per draw.
    nfsd_negative_prompt: str = ""
    # random: z_t from a fresh eps ~ N(0, I) (the paper; the one kind left, kept as a key so that a command naming
    # the retired ddim_inversion gets the allowed-values message).
    noise: str = "random"
    # Side the composite is resized to before the VAE encoder in this optimization; None = the backbone's
    # (model.resolution, else the model's native side). A smaller side makes the encoder's forward and
    # backward cheaper; it must be a multiple of the VAE factor times the UNet's downsampling (checked on load).
    encode_resolution: int | None = None


@dataclass
class BilateralConfig:
    """Image-guided bilateral filter applied to the mask logits (the *_bilateral kinds)."""

    kernel: int = 3
    sigma: float = 5.0  # spatial Gaussian, in pixels
    colour_tolerance: float = 0.08  # colour-similarity Gaussian, on RGB in [0, 1]
    iterations: int = 40


@dataclass
class FourierConfig:
    """The per-pixel MLP over random Fourier features (the fourier* kinds)."""

    num_features: int = 128
    scale: float = 10.0
    hidden: int = 256
    layers: int = 3


@dataclass
class RegionsConfig:
    """The image regions that ``mask.init=region`` starts from (:mod:`peekaboo.optim.regions`): Felzenszwalb segments
    of the image at the mask's resolution, ranked by the model's denoising error under the prompt with each
    region as a hard mask (the restarts' ``fit=error``) over ``draws`` draws they all share."""

    scale: float = 100.0  # Felzenszwalb's scale on RGB in [0, 1]: higher, fewer and larger regions
    sigma: float = 0.5  # Gaussian smoothing (pixels) before segmenting; it evens out pixel noise
    min_area: float = 0.002  # fraction of the image: smaller segments merge into a neighbour, then are dropped
    max_area: float = 0.5  # fraction of the image: larger segments (backgrounds) are not proposed
    draws: int = 16  # ranking draws per region
    # The ranking timesteps, t ~ U[t_min, t_max) as fractions of the training timesteps: the whole range, since
    # the noisiest draws tell an object's shape and colour apart best and the least noisy its edges.
    t_min: float = 0.02
    t_max: float = 0.98


@dataclass
class MaskConfig:
    kind: str = "fourier_bilateral"
    size: int = 256  # working resolution of the mask (square)
    init_logit: float = 0.0  # raster, init=constant: initial logit of every pixel (0 = alpha 0.5)
    # constant: raster logits at init_logit, the Fourier MLP's random init. cross_attention (raster kinds only):
    # before the first step the raster's logits become init_scale * (m - init_threshold), m the model's cross-attention
    # map of the prompt over the image in [0, 1] (peekaboo.diffusion.attention), so alpha starts above 0.5 where m is
    # above init_threshold (before any bilateral filter). region (raster kinds only): the logits become
    # init_scale * (r - init_threshold), r an image region in {0, 1} the model ranks best (peekaboo.optim.regions; the
    # k-th region start of a pair among its restarts takes the k-th best region, and with fewer regions than
    # region starts the extra ones keep the constant start). A resumed run keeps its checkpointed mask.
    init: str = "constant"
    # cross_attention and region: logits per unit of the map (or region); 8 with init_threshold 0.5 starts alpha in
    # 0.02 .. 0.98.
    init_scale: float = 8.0
    init_threshold: float = 0.5  # cross_attention and region: the map value that starts at alpha 0.5
    fourier: FourierConfig = field(default_factory=FourierConfig)
    bilateral: BilateralConfig = field(default_factory=BilateralConfig)
    regions: RegionsConfig = field(default_factory=RegionsConfig)


@dataclass
class LossConfig:
    # "Gravity" pulls alpha towards 0. With reduction "sum" it multiplies sum(alpha) over the mask pixels
    # (the paper); with "mean" it multiplies mean(alpha), i.e. sum(alpha) / (size*size).
    gravity: float = 0.05
    gravity_reduction: str = "sum"
    lambda_dream: float = 1.0


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 1e-5
    momentum: float = 0.0  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam / adamw only
    weight_decay: float = 0.0
    # The learning rate over a pair's trainer.max_steps steps: constant (the paper), cosine (from lr down to
    # final_lr_fraction * lr at the last step) or step (times step_gamma every step_every steps); each after
    # warmup_steps of linear warm-up from lr / warmup_steps.
    schedule: str = "constant"
    warmup_steps: int = 0
    final_lr_fraction: float = 0.0  # cosine only
    step_every: int = 100  # step only
    step_gamma: float = 0.5  # step only


@dataclass
class TrainerConfig:
    """The subset of ``lightning.Trainer`` arguments a Peekaboo run uses."""

    accelerator: str = "auto"
    devices: int = 1  # dataset runs: worker processes, one device each
    precision: str = "32-true"
    # PyTorch's deterministic kernels where they exist (an operation without one warns, in the log); Lightning's
    # `deterministic="warn"`. For reproducible masks on a GPU (README, "Real checkpoints on GPUs").
    deterministic: bool = False
    max_steps: int = 300
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True


@dataclass
class EarlyStopConfig:
    """Stop a pair when its binary mask has stopped changing (and, with ``loss_tolerance``, its dream loss
    has stopped improving). In a batch each pair stops on its own and is frozen from then on; the batch ends
    when all its pairs have stopped."""

    enabled: bool = False
    tolerance: float = 0.002  # at most this fraction of the mask's pixels flipped between checks ...
    patience: int = 20  # ... for this many consecutive steps
    min_steps: int = 50  # never stop before this step
    # None: the mask test alone. A number: also wait until the EMA of the pair's dream loss has not fallen
    # below (1 - loss_tolerance) times its best value for `patience` steps.
    loss_tolerance: float | None = None
    loss_ema: float = 0.9  # decay of that EMA (0: the raw per-step loss, which the random t makes noisy)


@dataclass
class RestartsConfig:
    """Several independent optimizations of each pair, one kept, chosen by the model itself (no labels): the
    candidate whose composite the prompt explains best, i.e. with the lowest denoising error under the prompt
    over ``draws`` (background, timestep, noise) draws that all of a pair's candidates share
    (:mod:`peekaboo.optim.restarts`). Candidate 0 is the single optimization's mask, bit for bit."""

    count: int = 1  # optimizations per pair; 1: one (the paper), no scoring
    draws: int = 16  # scoring draws per candidate (one VAE encode and one UNet call of this batch)
    t_min: float = 0.2  # the scoring timesteps, t ~ U[t_min, t_max) as fractions of the training timesteps
    t_max: float = 0.8
    # error: the mean denoising error under the prompt; error_ratio: the mean of that error over the error under
    # the empty prompt on the same draw, i.e. how much the prompt explains beyond what any caption would. The
    # ratio discounts how easy a composite is to denoise at all (a large plain object, a small one, an empty
    # background), which the plain error rewards regardless of the prompt. One more UNet row per draw.
    # objective: the guided denoising objective whose gradient the optimization follows, at
    # guidance.guidance_scale (the same two UNet rows).
    fit: str = "error"
    # Each candidate's mask.init, cycled (candidate k takes mask_inits[k % len]); empty: mask.init for all. A
    # mix (e.g. [constant, cross_attention]) gives candidates that start apart and so settle apart.
    mask_inits: list[str] = field(default_factory=list)
    # When the kept candidate is chosen: 0, at the end (every candidate runs every step); N > 0, after step N,
    # by the same fit on the masks of that step, the others frozen there, so the steps after N cost one
    # optimization per pair: count * N + (max_steps - N) pair-steps in all instead of count * max_steps.
    choose_at: int = 0


@dataclass
class OptimizationConfig:
    """Everything that defines one pair's optimization."""

    seed: int = 0
    background: str = "solid"  # random solid colour each step (the paper); "noise" or "blur" also work
    threshold: float = 0.5  # binary mask = alpha > threshold
    mask: MaskConfig = field(default_factory=MaskConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    restarts: RestartsConfig = field(default_factory=RestartsConfig)
    # Where the composite is made: "pixel" (alpha * image + (1 - alpha) * background, VAE-encoded with
    # gradient: the paper's) or "latent" (alpha pooled to the latent grid blends the image's cached latents
    # with the background's, encoded without gradient: no VAE backward, an approximation of the encoding).
    composite: str = "pixel"


@dataclass
class ImageConfig:
    """How an image becomes the square working canvas, and how the mask maps back."""

    # scale (stretch), crop (centre crop; outside the crop alpha is 0), or pad. The official code crops; scale keeps
    # every pixel of the image in the mask, which evaluation needs (docs/DESIGN.md, "Departures from the official
    # code").
    fit: str = "scale"
    # RGBA images are flattened over this colour (RGB in [0, 1]) before use.
    flatten_background: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    # Refuse images with more pixels than this (decompression bombs).
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class SamplingConfig:
    """Sampling from the diffusion model (edit and generate), with diffusers' pipelines."""

    steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    size: int | None = None  # square output side for generate; None = the model's native resolution


@dataclass
class EditConfig:
    """Regenerate the segmented region from a new prompt, keeping every pixel outside it."""

    prompt: str | None = None  # e.g. "a blue square"; None = no edit
    strength: float = 1.0  # 1 = the masked region is regenerated from pure noise; lower keeps more of it
    dilation: int = 2  # grow the binary mask by this many pixels (of the original image) before editing
    feather: float = 2.0  # ramp width in pixels inside the dilated mask: 0 at its border, full edit this far in


@dataclass
class PredictConfig:
    """``predict.py``: segment one image for one or more prompts (or a generated one: ``generate=``)."""

    image: str | None = None
    prompt: list[str] = field(default_factory=list)
    # Text to RGBA: sample an image for this prompt, segment it with the same prompt, write an RGBA PNG.
    generate: str | None = None
    output_dir: str = "outputs"
    tensorboard: bool = True  # TensorBoard logs under <output_dir>/tb (predict's only logger)
    edit: EditConfig = field(default_factory=EditConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    image_options: ImageConfig = field(default_factory=ImageConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)




@dataclass
class DataConfig:
    """Where a dataset run's pairs come from (see ``peekaboo.data``)."""

    source: str = MISSING  # manifest | objects | shapes | voc | refcoco | folder
    # manifest: the JSONL/CSV file (image, prompt, optional mask, optional id; paths relative to it).
    manifest: str | None = None
    # voc: the VOC2012 folder (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/);
    # refcoco: the folder holding refs(<split_by>).p and instances.json, and images under images_dir;
    # folder: the folder searched recursively for images.
    root: str | None = None
    # folder: the prompts of every image without a sidecar <image stem>.txt (which replaces them for its image).
    prompts: list[str] = field(default_factory=list)
    extensions: list[str] = field(default_factory=lambda: [".png", ".jpg", ".jpeg", ".webp"])  # folder: suffixes
    images_dir: str | None = None  # refcoco: COCO train2014 images (default <root>/images)
    split: str = "val"  # voc: ImageSets/Segmentation/<split>.txt; refcoco: the refs' split; objects, shapes: eval | ...
    split_by: str = "unc"  # refcoco: reads refs(<split_by>).p
    num_pairs: int | None = None  # shapes: how many pairs; other sources: keep only the first N
    # Manifest paths outside the manifest's folder (../, absolute) are refused unless this is set.
    allow_outside_root: bool = False
    # Pairs optimized together in one module (one VAE and one UNet call per step); each stays independent.
    pairs_per_step: int = 1


@dataclass
class RunConfig:
    """A dataset run's outputs and bookkeeping under ``<root>/<name>/``."""

    name: str = MISSING
    root: str = "runs"
    checkpoint_every_n_steps: int = 50  # per-pair ModelCheckpoint; a resumed pair continues from the last one
    keep_checkpoints: bool = False  # delete a pair's checkpoints once it is done
    save_overlays: bool = True
    logger: str = "tensorboard"  # tensorboard | csv | wandb | mlflow | none (no logger at all)
    # How many pairs get a logger run of their own (curves, and with TensorBoard mask images): the pairs whose
    # output name hashes lowest, the same ones whatever the batching or the number of workers; null: every pair.
    # Every worker's run (worker<rank>, worker<rank>-losses) holds job-level aggregates of all its pairs.
    log_pairs: int | None = 64
    # Seconds between the job-wide progress lines (pairs finished of all, ETA) in a log that is not a terminal.
    progress_every_s: float = 30.0


@dataclass
class TrainConfig:
    """``train.py``: optimize every pair of a dataset."""

    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    image_options: ImageConfig = field(default_factory=ImageConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

