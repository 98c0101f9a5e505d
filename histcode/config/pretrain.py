"""Sections of contrastive pretraining: augmentation, the linear probe, stain normalisation, the training run."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from histcode.config.base import Fraction, Microns, MicronsPerPixel, Pixels, SquareMicrons, _Section  # noqa: F401


class AugmentConfig(_Section):
    """Two views per tile, generated on the device by kornia. Probabilities are per image."""

    crop_scale: tuple[Fraction, Fraction] = (0.2, 1.0)  # random resized crop, share of the tile's area
    hflip_p: Fraction = 0.5
    vflip_p: Fraction = 0.5
    rot90_p: Fraction = 0.5  # a random multiple of 90 degrees
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    color_jitter_p: Fraction = 0.0  # off: after stain normalisation colour (the H/E balance) is information
    grayscale_p: Fraction = 0.0
    blur_p: Fraction = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels of a 224 px image, scaled with image_px
    stain_p: Fraction = 0.8  # H&E stain jitter in optical-density space: the stain robustness
    stain_scale: Annotated[float, Field(ge=0, le=1)] = 0.5  # stain concentrations scaled by U(1 - s, 1 + s)
    stain_shift: Annotated[float, Field(ge=0, le=1)] = 0.1  # ... and shifted by U(-s, s) OD units

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        if self.crop_scale[0] > self.crop_scale[1] or self.blur_sigma[0] > self.blur_sigma[1]:
            raise ValueError("pretrain.augment: ranges must be (low, high)")
        return self


class ProbeConfig(_Section):
    """Linear probe on held-aside labelled tiles: frozen embeddings -> logistic regression, grouped CV; once on
    the tiles as they are and once on the same tiles re-stained (a random stain per tile, in OD space)."""

    enabled: bool = True
    source_dir: str | None = None  # LC25000 with labels.csv; None = the bundled copy
    split: str = "val"
    folds: Annotated[int, Field(ge=2)] = 5
    max_iter: Pixels = 2000
    stain_log_sd: Annotated[float, Field(ge=0)] = 0.5  # re-staining: log-normal stretch of H and E concentrations
    stain_angle: Annotated[float, Field(ge=0, le=45)] = 10.0  # ... and turns of each stain vector, degrees (at most)
    split_seed: int = 0  # the fixed split of the tiles' groups into a tuning half and a reporting half
    bootstrap: Annotated[int, Field(ge=0)] = 1000  # paired group resamples of the reporting half (95% intervals)


class StainNormConfig(_Section):
    """Stain normalisation of every slide tile an encoder sees (pretraining, embedding): Macenko et al. (2009),
    estimated once per slide from a sample of its tiles, mapped onto Macenko's reference stain. Recorded with
    the encoder, so its feature views read tiles the same way (loose tiles are read as they are)."""

    method: Literal["macenko", "none"] = "macenko"
    sample_tiles: Annotated[int, Field(ge=1)] = 24  # tiles per slide the stain is estimated from (evenly spread)
    beta: Annotated[float, Field(gt=0)] = 0.15  # OD norm a pixel must exceed to count as stained
    alpha: Annotated[float, Field(gt=0, lt=50)] = 1.0  # percentile of the extreme angles (robust extremes)
    # the slide's glass white point (bright grey pixels of its sampled tiles) taken out of the OD first, so that a
    # scanner's dimmer lamp or flatter contrast is not read as stain (wsi.stain.estimate_white); encoders
    # registered before it was an option read without it
    white_point: bool = True


class PretrainConfig(_Section):
    """Contrastive pretraining. Defaults fit the demo on a 2-core CPU; the paper's AdCo: encoder resnet50_l3,
    image_px 224, batch_size 256, bank_size 65536, epochs 200."""

    method: Literal["adco", "moco", "simclr"] = "adco"
    encoder: str = "resnet18_l3"
    init: Literal["random", "imagenet"] = "random"
    image_px: Pixels = 112
    batch_size: Annotated[int, Field(ge=2)] = 64
    epochs: Annotated[float, Field(gt=0)] = 2.0
    max_steps: Annotated[int, Field(ge=1)] | None = None  # overrides epochs
    # None: the linear scaling rule, the method's base rate at batch 256 (BASE_LR: AdCo and MoCo v2 0.03, SimCLR 0.3)
    # x batch_size / 256 x lr_scale; a number sets the rate outright
    lr: Annotated[float, Field(gt=0)] | None = None
    lr_scale: Annotated[float, Field(gt=0)] = 1.0
    momentum: Fraction = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    warmup_steps: Annotated[int, Field(ge=0)] = 5
    proj_dim: Pixels = 128
    temperature: Annotated[float, Field(gt=0)] | None = None  # None = the method's: simclr 0.2, moco 0.2, adco 0.12
    key_momentum: Fraction = 0.99  # momentum of the key encoder (moco, adco) at the first step ...
    key_momentum_schedule: Literal["cosine", "constant"] = "cosine"  # ... rising to 1 at the last (BYOL's cosine)
    queue_size: Pixels = 4096  # MoCo (paper 65536), at most negatives_fraction of the tiles
    bank_size: Pixels = 1024  # AdCo (paper 65536), at most negatives_fraction of the tiles
    # queue and bank hold at most this share of the training tiles (whole batches, at least one): the paper's
    # 65,536 of ImageNet's 1.28M is 5%; a queue larger than the data holds stale keys of the query's own tile
    negatives_fraction: Annotated[float, Field(gt=0, le=1)] = 0.25
    bank_temperature: Annotated[float, Field(gt=0)] = 0.02
    bank_lr: Annotated[float, Field(gt=0)] = 3.0
    bank_momentum: Fraction = 0.9
    bank_weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    symmetric: bool = False  # also use (view 2, view 1) as a query/key pair (AdCo's --sym)
    shuffle_bn: bool = True  # MoCo/AdCo: keys on a shuffled batch (across processes; split batch norm on one device)
    bn_splits: Pixels = 8  # sub-batches of batch norm on one device (shuffle_bn); lowered to divide the batch
    bank_init: Literal["train", "keys"] = "train"  # AdCo: the authors' warm-up that trains while it fills the bank, or keys only
    locality_chunk: Pixels = 1  # >1: shuffle runs of this many neighbouring tiles (stored JPEG tiles decoded once)
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 with a grad scaler)
    checkpoint_every: Pixels = 25
    log_every: Pixels = 5
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"  # DataLoader reader processes
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    register_as: str = "histcode-encoder"
    # patients of these label-set folds are left out of pretraining, and the heads report their metrics pooled over
    # them apart (strict_*); "auto": the first half of the folds (rounded down, at least one) when a label set
    # exists, else none (with a warning); () = none (transductive)
    exclude_test_folds: tuple[Annotated[int, Field(ge=0)], ...] | Literal["auto"] = "auto"
    augment: AugmentConfig = AugmentConfig()
    stain_norm: StainNormConfig = StainNormConfig()
    probe: ProbeConfig = ProbeConfig()

    def method_temperature(self) -> float:
        return self.temperature if self.temperature is not None else {"simclr": 0.2, "moco": 0.2, "adco": 0.12}[self.method]

    def learning_rate(self) -> float:
        """The SGD learning rate: ``lr`` when set, else the linear scaling rule for the method."""
        if self.lr is not None:
            return self.lr
        return BASE_LR[self.method] * self.batch_size / 256 * self.lr_scale


# the methods' published base learning rates at batch 256 (MoCo v2, AdCo: 0.03 with SGD; SimCLR: 0.3 x B / 256)
BASE_LR = {"adco": 0.03, "moco": 0.03, "simclr": 0.3}
