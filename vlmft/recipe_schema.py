"""The recipe schema: one dataclass per section, the help text as a string under each field.

Written once, here: vlmft/recipe.py loads and validates recipes against it (and re-exports
every class), ``vlmft recipe [SECTION]`` prints it with the defaults and ``vlmft recipe
--init`` writes a commented starting recipe from it (vlmft/recipe_doc.py). A field made with
:func:`choice` accepts only the values listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union


def choice(default, *choices):
    return field(default=default, metadata={"choices": choices})


@dataclass
class ModelConfig:
    name_or_path: str = "demo/model"
    """HF hub id or local folder of an image-text-to-text model (loaded with from_pretrained)."""
    attn_implementation: str = choice("auto", "auto", "sdpa", "eager", "flex_attention", "flash_attention_2",
                                      "flash_attention_3")
    """Attention kernel; packed samples stay isolated in each. auto: on a CUDA GPU the first of
    flash_attention_3 (Hopper), flash_attention_2, flex_attention that is installed and that the
    model supports, else sdpa; sdpa without a GPU. sdpa builds a dense L x L mask for packed rows
    (a warning says when it is large); eager is refused with packing (vlmft/attention.py)."""
    trust_remote_code: bool = False
    """Allow the model folder's own Python code to run. Off unless you trust the folder."""
    gradient_checkpointing: str = choice("none", "none", "vision", "language", "both")
    """Recompute activations in the backward pass to save memory: in the vision tower, the
    language model, or both."""


@dataclass
class DatasetConfig:
    path: str = ""
    """Conversation JSONL (a record a line) or a .json array of records, each in the
    LLaVA/InternVL 'conversations' or the 'messages' format; or an InternVL meta JSON."""
    name: str = ""
    """Name used in reports; defaults to the file name."""
    image_root: str = ""
    """Folder that relative image paths are read from; defaults to the data file's folder."""
    repeat_time: float = 1.0
    """InternVL's rule: below 1 takes a random fraction of the samples, above 1 repeats them."""
    loss_weight: float = 1.0
    """Weight d(s) of this dataset's samples in the loss (see vlmft/loss.py)."""


@dataclass
class EvalDatasetConfig:
    path: str = ""
    """Held-out conversations: JSONL, a .json array of records or an InternVL meta JSON (as in
    data.datasets)."""
    name: str = ""
    """Name in eval reports and metrics (eval/NAME/loss); defaults to the file name."""
    image_root: str = ""
    """Folder that relative image paths are read from; defaults to the data file's folder."""
    measures: str = ""
    """The training dataset (its name in data.datasets) whose progress this set measures, for
    data.adaptive (which checks it); empty = the training dataset of the same name, if any."""


@dataclass
class PackingConfig:
    enabled: bool = True
    """Pack several samples into one row of at most max_packed_tokens; off = one sample a row."""
    strategy: str = choice("best_fit", "best_fit", "internvl", "next_fit")
    """best_fit: best-fit-decreasing over a window (ours); internvl: InternVL's PackedDataset
    decisions; next_fit: fill in order, emit when full (torchtune and others)."""
    max_packed_tokens: int = 1024
    """Token capacity of a packed row."""
    max_buffer_size: int = 64
    """How many packs may be open (still filling) at once."""
    window: int = 4096
    """How many pending samples best_fit sorts and chooses from."""
    num_images_expected: int = 0
    """Most image tiles in one pack (0 = no limit)."""
    allow_overflow: bool = False
    """strategy=internvl only (InternVL's knob): when no open pack fits a sample and at least
    max_buffer_size // 2 are open, emit the last one with tile room and open a new pack for the
    sample (InternVL would cut the sample into it; vlmft never splits samples)."""
    strict_mode: bool = False
    """Refused when true: InternVL's strict_mode pads evicted packs with zero images up to
    num_images_expected and changes no grouping; vlmft never spends compute on blank tiles."""
    min_active_tokens_ratio: float = 0.0
    """Sample filter, every strategy (InternVL's check_valid): a sample whose supervised tokens
    are below this fraction of its length is not used; dropped and counted (low_supervised_ratio)."""
    balance_compute: bool = False
    """strategy=best_fit: aim every pack at the same modelled compute (tokens + sum L^2 /
    attention_cost_length + tile_cost x tiles), not only full rows, and put the packs that stay
    off the median in steps together, so that one pack a rank is balanced (Zeppelin's goal)."""
    overlong: str = choice("drop", "drop", "truncate")
    """What to do with a sample longer than max_packed_tokens: drop (counted) or truncate at a
    text boundary outside image spans, if supervised tokens remain."""


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = field(default_factory=list)
    """The training datasets, mixed by size x repeat_time."""
    eval: list[EvalDatasetConfig] = field(default_factory=list)
    """Held-out datasets evaluated every eval.every_steps and at the end (see the eval section)."""
    packing: PackingConfig = field(default_factory=PackingConfig)
    """How samples are grouped into rows."""
    max_tiles_per_image: int = 0
    """Most tiles one image is cut into (InternVL's max_dynamic_patch); 0 = the processor's."""
    on_bad_sample: str = choice("skip", "skip", "error")
    """skip: count it by reason and report file:line; error: stop at the first one."""
    max_bad_fraction: float = 0.01
    """Stop training once more than this fraction of the samples read were bad."""
    num_workers: Union[int, str] = "auto"
    """DataLoader worker processes per rank that build tensors (0 = in the training process).
    auto: with a CUDA GPU, the CPUs available to the machine's ranks shared among them, minus one
    for the rank itself, at most 8; without one 0 (the step itself computes on those CPUs)."""
    prefetch_steps: int = 2
    """With num_workers > 0: optimizer steps of micro-batches the workers build ahead (per rank)."""
    mixture: str = choice("size", "size", "temperature")
    """How datasets are mixed: size = in proportion to samples x repeat_time (InternVL's rule);
    temperature = p_i proportional to n_i^(1/tau), n_i = samples x repeat_time, tau below."""
    temperature: float = 1.0
    """tau of mixture=temperature (at the start of training under a schedule): 1 = by size,
    larger flattens the mix toward uniform (small datasets upsampled)."""
    temperature_schedule: str = choice("constant", "constant", "linear")
    """constant: tau stays data.temperature; linear: tau moves linearly from data.temperature to
    data.temperature_end over train.max_steps (e.g. 3 -> 1: a cooldown to the natural mix)."""
    temperature_end: float = 1.0
    """tau at the end of training under temperature_schedule=linear."""
    round_size: int = 0
    """Samples per mixture round (0 = the catalog's sample count: a round is an epoch). Each round
    draws its mix at the tau of its start, shuffles and packs; smaller rounds follow a tau
    schedule more finely, larger ones leave fewer part-filled packs at round ends."""
    rank_balance: str = choice("compute", "compute", "round_robin")
    """How a step's packs are dealt to ranks and micro-batches: compute = balance the estimated
    compute (tokens + attention + vision tiles); round_robin = pack j to rank j % world."""
    attention_cost_length: int = 49152
    """For rank_balance and packing.balance_compute: the sample length L* whose attention costs as
    much as its linear layers (about 12 x the LLM hidden size); a pack costs tokens +
    sum(L^2)/L* + tile_cost x tiles."""
    tile_cost: float = 64.0
    """For rank_balance and packing.balance_compute: the vision tower's cost of one image tile,
    in language-model tokens."""
    step_balance: str = choice("none", "none", "dataset", "modality")
    """M2-omni's step balance: every optimizer step holds each group's share of the round's
    samples to within one pack (dataset = the datasets; modality = text-only, one image,
    several images); none = packs of all groups shuffled together."""
    adaptive: str = choice("none", "none", "progress", "difficulty")
    """Per-dataset loss weights recomputed from the held-out losses at every evaluation
    (vlmft/data/adaptive.py): progress (M2-omni) or difficulty (VisATB). Needs data.eval with a
    set that measures each training dataset."""
    adaptive_floor: float = 0.5
    """data.adaptive: lowest weight a dataset can get (weights average 1)."""
    adaptive_cap: float = 2.0
    """data.adaptive: highest weight a dataset can get."""
    adaptive_smoothing: float = 0.5
    """data.adaptive: share of the previous weights kept at each update (0 = no smoothing)."""


@dataclass
class LossConfig:
    reduction: str = choice("square", "token", "sample", "square")
    """Per-token weight w(n), n = supervised tokens of the token's sample: token 1, sample 1/n,
    square 1/sqrt(n). Normalized over the whole optimizer step on every rank."""
    chunk_size: int = 2048
    """Tokens per chunk of the fp32 cross-entropy, so large vocabularies never hold fp32 logits
    for a whole row."""


@dataclass
class LayerDecayConfig:
    vision: float = 1.0
    """lr x vision^(top - layer_id) over the vision tower (1.0 = off)."""
    language: float = 1.0
    """lr x language^(top - layer_id) over the language model (1.0 = off)."""


@dataclass
class FreezeConfig:
    vision: bool = False
    """Freeze the whole vision tower."""
    projector: bool = False
    """Freeze the vision-to-language projector."""
    language: bool = False
    """Freeze the language model (embeddings and blocks; the lm_head has its own switch)."""
    lm_head: bool = False
    """Freeze the output head (tied heads follow the input embeddings)."""
    vision_first_layers: int = 0
    """Freeze the vision embeddings and the first N vision blocks."""
    vision_last_layers: int = 0
    """Freeze the last N vision blocks."""


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.05
    """Decoupled weight decay for matrices; norms, biases, embeddings and 1-D params get none."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    layer_decay: LayerDecayConfig = field(default_factory=LayerDecayConfig)
    """Layer-wise LR decay per tower."""
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    """Glob pattern over parameter names -> LR factor, e.g. {'*multi_modal_projector*': 10.0}."""
    no_decay: list[str] = field(default_factory=list)
    """Extra glob patterns of parameters that get no weight decay."""
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    """Which parts do not train."""


@dataclass
class ScheduleConfig:
    name: str = choice("cosine", "cosine", "linear", "constant")
    """Decay after warmup."""
    warmup_steps: int = 0
    """Linear warmup from 0 to the peak LR over this many optimizer steps."""
    min_lr_ratio: float = 0.0
    """Final LR as a fraction of the peak."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps to run. Leave it out when train.epochs is set."""
    epochs: float = 0.0
    """Passes over the data (every dataset's samples x repeat_time) instead of max_steps: the
    steps are computed from the pack plan (packs per pass / global batch, rounded up) and printed
    at start-up. 0 = use max_steps."""
    micro_batch_size: int = 1
    """Packs per rank per micro-batch (one forward/backward)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step on each rank."""
    seed: int = 0
    """Seed for model init, shuffling and mixture sampling."""

    max_nonfinite_steps: int = 3
    """Stop after this many optimizer steps in a row whose gradient norm was not finite (each is
    skipped on every rank: no update, counted in metrics as nonfinite_steps)."""

    def global_batch(self, world_size: int) -> int:
        """Packs per optimizer step over all ranks: micro_batch_size x grad_accum_steps x world."""
        return self.micro_batch_size * self.grad_accum_steps * world_size


@dataclass
class EngineConfig:
    zero_stage: int = choice(2, 0, 1, 2, 3)
    """DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    precision: str = choice("bf16", "fp32", "bf16", "fp16")
    """Training precision (master weights stay fp32)."""
    gradient_clipping: float = 1.0
    """Clip the global gradient norm to this value (0 = off)."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory (ZeRO 1-3)."""
    offload_params: bool = False
    """Keep parameters in CPU memory (ZeRO 3)."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed config keys passed through (an optimizer/scheduler block is refused)."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save every N optimizer steps (0 = only at the end)."""
    keep_last: int = 2
    """How many step checkpoints to keep."""


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Evaluate data.eval every N optimizer steps (0 = only at the end; the end always is)."""
    visual_reliance: bool = True
    """Also measure the eval loss with every image replaced by a blank one of the same size
    (eval/NAME/loss_blank_images and eval/NAME/visual_gap, the difference)."""
    generate: bool = False
    """Greedy answers to the eval samples whose reference (last assistant turn) fits
    max_new_tokens: exact match per dataset, predictions in output_dir/eval/stepN/NAME.jsonl
    (`vlmft eval` answers unless --no-generate)."""
    max_new_tokens: int = 32
    """Most tokens generated per answer; samples with a longer reference are scored by loss only."""
    max_generate_samples: int = 0
    """Most samples per eval dataset answered by generation, the first ones (0 = every short one)."""


@dataclass
class LogConfig:
    every_steps: int = 1
    """Log metrics every N optimizer steps."""
    tensorboard: bool = False
    """Also write TensorBoard event files under output_dir/tb."""
    wandb: bool = False
    """Also log to Weights & Biases (pip install 'vlmft[wandb]'); files under output_dir/wandb."""
    wandb_project: str = "vlmft"
    """log.wandb: the W&B project."""
    wandb_run_name: str = ""
    """log.wandb: the run's name; empty = the output_dir folder's name."""
    wandb_mode: str = choice("online", "online", "offline")
    """log.wandb: online syncs as it goes; offline writes only locally (`wandb sync` later)."""


@dataclass
class LoraTargetsConfig:
    language: list[str] = field(default_factory=lambda: ["linear"])
    """Modules of the language model that get LoRA adapters: globs over full module names (a
    glob also matches a name's last components: 'q_proj' is every ....q_proj), or 'linear' for
    every nn.Linear of the tower. Only nn.Linear layers can be targets."""
    vision: list[str] = field(default_factory=list)
    """The same for the vision tower; empty: no adapter reaches it."""
    projector: list[str] = field(default_factory=list)
    """The same for the vision-to-language projector (Qwen's merger)."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters (through peft) instead of the weights: only the adapters and
    lora.modules_to_save train; every other weight stays frozen as loaded."""
    r: int = 8
    """Rank of each adapter (lora_A is r x in, lora_B out x r)."""
    alpha: float = 16.0
    """Scaling: an adapter adds (alpha / r) x B A x to its layer (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on an adapter's input (not on the frozen layer's path)."""
    rslora: bool = False
    """Rank-stabilized LoRA: scale by alpha / sqrt(r) instead of alpha / r."""
    init: str = choice("default", "default", "gaussian", "orthogonal")
    """peft's init_lora_weights: default (A Kaiming-uniform, B zero), gaussian (A normal with
    std 1/r, B zero), orthogonal (A and B both non-zero, from orthogonal halves of one QR, so B A
    is zero up to rounding; needs an even r). Each starts the model at the base model."""
    targets: LoraTargetsConfig = field(default_factory=LoraTargetsConfig)
    """Where adapters go, per tower (towers as vlmft lr-table places them)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained fully beside the adapters (peft's modules_to_save), e.g. [projector]:
    globs over full module names, or a tower name (projector, vision, language, head)."""
    quantize: str = choice("none", "none", "nf4")
    """QLoRA: nf4 loads the language model's frozen weights in 4-bit NF4 through bitsandbytes
    (double quantization; vision tower, projector and head stay unquantized). Needs CUDA."""


@dataclass
class Recipe:
    output_dir: str = "runs/vlmft"
    """Where metrics.jsonl, checkpoints and the final HF folder go."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to fine-tune."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data and packing."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss reduction."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer, parameter groups and freezing."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Steps, batch and seed."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """DeepSpeed settings."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation on data.eval: held-out loss, visual reliance, answer accuracy."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    log: LogConfig = field(default_factory=LogConfig)
    """Metrics."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA / QLoRA adapters (off by default: full fine-tuning)."""
