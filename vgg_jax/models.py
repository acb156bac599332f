"""The VGG family of Simonyan & Zisserman (2015) as one Flax linen module.

Every configuration (A, A-LRN, B, C, D, E and torchvision's batch-norm
variants) is a `VGGSpec`: the kernel sizes of the convolutions in each of the
five stages. One `VGG` module builds any of them. Its parameters serve two
views of the classifier head:

* `model.apply(variables, x)`: the training view. Inputs at the training
  resolution; FC1 is a dense layer over the flattened last feature map.
* `model.apply(variables, x, method="score_map")`: the fully-convolutional
  view of the paper's dense evaluation. FC1's kernel, stored as a
  (k, k, C, 4096) window, slides over the feature map of an input of any size
  >= the training resolution; FC2 and FC3 act as 1x1 convolutions.

Run `python -m vgg_jax.models` for a table of every configuration.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vgg_jax import layers

Array = jax.Array

STAGE_WIDTHS = (64, 128, 256, 512, 512)
NUM_STAGES = len(STAGE_WIDTHS)


@dataclasses.dataclass(frozen=True)
class VGGSpec:
    """One configuration: the conv kernel sizes of each stage, LRN and BN flags."""

    name: str
    letter: str
    stages: tuple[tuple[int, ...], ...]
    lrn: bool = False
    batch_norm: bool = False

    @property
    def num_weight_layers(self) -> int:
        return sum(len(stage) for stage in self.stages) + 3


def _spec(name: str, letter: str, convs_per_stage: Sequence[Sequence[int]], **flags) -> VGGSpec:
    return VGGSpec(name, letter, tuple(tuple(s) for s in convs_per_stage), **flags)


_A = ((3,), (3,), (3, 3), (3, 3), (3, 3))
_B = ((3, 3), (3, 3), (3, 3), (3, 3), (3, 3))
_C = ((3, 3), (3, 3), (3, 3, 1), (3, 3, 1), (3, 3, 1))
_D = ((3, 3), (3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))
_E = ((3, 3), (3, 3), (3, 3, 3, 3), (3, 3, 3, 3), (3, 3, 3, 3))

SPECS: dict[str, VGGSpec] = {
    s.name: s
    for s in (
        _spec("vgg11", "A", _A),
        _spec("vgg11_lrn", "A-LRN", _A, lrn=True),
        _spec("vgg13", "B", _B),
        _spec("vgg16_c", "C", _C),
        _spec("vgg16", "D", _D),
        _spec("vgg19", "E", _E),
        _spec("vgg11_bn", "A-BN", _A, batch_norm=True),
        _spec("vgg13_bn", "B-BN", _B, batch_norm=True),
        _spec("vgg16_bn", "D-BN", _D, batch_norm=True),
        _spec("vgg19_bn", "E-BN", _E, batch_norm=True),
    )
}
# The paper's letters, as further names for the same specs.
ALIASES: dict[str, str] = {spec.letter.lower(): name for name, spec in SPECS.items()}

MODEL_OPTIONS = (
    "num_classes",
    "width_divisor",
    "fc_width",
    "dropout_rate",
    "image_size",
    "dtype",
    "param_dtype",
    "initializer",
)
INITIALIZERS = ("glorot", "normal")


def available_models() -> list[str]:
    """Every accepted model name: the torchvision-style names, then the paper's letters."""
    return list(SPECS) + [spec.letter for spec in SPECS.values()]


def get_spec(name: str) -> VGGSpec:
    """Looks a configuration up by name ('vgg16') or paper letter ('D', 'A-LRN')."""
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key.replace("_", "-"), key)
    if key in SPECS:
        return SPECS[key]
    valid = available_models()
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown model name {name!r}.{hint} Valid names: {', '.join(valid)}.")


def feature_map_size(image_size: int) -> int:
    """Side of the last feature map for a square input (five floor-halving pools)."""
    size = image_size
    for _ in range(NUM_STAGES):
        size //= 2
    return size


def conv_layer_names(spec: VGGSpec) -> list[str]:
    """'conv1_1', 'conv1_2', ... in network order (the names used in the parameter tree)."""
    return [
        f"conv{stage + 1}_{i + 1}"
        for stage, kernels in enumerate(spec.stages)
        for i in range(len(kernels))
    ]


def _initializers(init: str, fan_in_axes: int | Sequence[int] = -2):
    """Kernel initializer for the given scheme; biases are always zero."""
    if init == "glorot":
        return nn.initializers.variance_scaling(
            1.0, "fan_avg", "uniform", in_axis=fan_in_axes, out_axis=-1
        )
    if init == "normal":
        return nn.initializers.normal(stddev=0.01)
    raise ValueError(f"Unknown init {init!r}; choose one of {INITIALIZERS}.")


class VGGFeatures(nn.Module):
    """The five convolutional stages. Returns the last (pooled) feature map.

    With `capture`, also returns the named activations: 'conv{s}_{i}' (before
    the ReLU, after BN where present), 'relu{s}_{i}', 'lrn1' and 'pool{s}'.
    """

    spec: VGGSpec
    width_divisor: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    initializer: str = "glorot"

    @nn.compact
    def __call__(
        self, x: Array, train: bool = False, capture: Iterable[str] = ()
    ) -> tuple[Array, dict[str, Array]]:
        capture = set(capture)
        captured: dict[str, Array] = {}

        def keep(name: str, value: Array) -> None:
            if name in capture:
                captured[name] = value

        kernel_init = _initializers(self.initializer)
        for stage, kernels in enumerate(self.spec.stages):
            width = max(1, STAGE_WIDTHS[stage] // self.width_divisor)
            for i, kernel_size in enumerate(kernels):
                suffix = f"{stage + 1}_{i + 1}"
                x = layers.Conv(
                    width,
                    kernel_size,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    kernel_init=kernel_init,
                    name=f"conv{suffix}",
                )(x)
                if self.spec.batch_norm:
                    x = nn.BatchNorm(
                        use_running_average=not train,
                        momentum=0.9,
                        epsilon=1e-5,
                        dtype=self.dtype,
                        param_dtype=self.param_dtype,
                        name=f"bn{suffix}",
                    )(x)
                keep(f"conv{suffix}", x)
                x = nn.relu(x)
                keep(f"relu{suffix}", x)
                if self.spec.lrn and stage == 0 and i == 0:
                    x = layers.local_response_norm(x)
                    keep("lrn1", x)
            x = layers.max_pool_2x2(x)
            keep(f"pool{stage + 1}", x)
        return x, captured


class WindowDense(nn.Module):
    """FC1: a dense layer over a k x k feature window, stored as a conv kernel.

    `dense=True` flattens a k x k input and multiplies (the training view);
    `dense=False` slides the same kernel over a larger map (VALID convolution).
    Flattening is (h, w, c) order, so both views use one (k, k, C, F) kernel.
    """

    features: int
    window: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    initializer: str = "glorot"

    @nn.compact
    def __call__(self, x: Array, dense: bool) -> Array:
        shape = (self.window, self.window, x.shape[-1], self.features)
        kernel = self.param(
            "kernel",
            _initializers(self.initializer, fan_in_axes=(0, 1, 2)),
            shape,
            self.param_dtype,
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if dense:
            return x.reshape(x.shape[0], -1) @ kernel.reshape(-1, self.features) + bias
        return layers.conv2d(x, kernel, padding="VALID") + bias


class VGG(nn.Module):
    """A VGG network; see the module docstring for its two views."""

    spec: VGGSpec
    num_classes: int = 1000
    width_divisor: int = 1
    fc_width: int = 4096
    dropout_rate: float = 0.5
    image_size: int = 224
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    initializer: str = "glorot"

    def setup(self) -> None:
        if feature_map_size(self.image_size) < 1:
            raise ValueError(
                f"image_size={self.image_size} is too small: five 2x2 pools need at least 32."
            )
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.features = VGGFeatures(
            self.spec, self.width_divisor, initializer=self.initializer, **common
        )
        self.fc6 = WindowDense(
            self.fc_width, feature_map_size(self.image_size), initializer=self.initializer, **common
        )
        dense_init = _initializers(self.initializer)
        self.fc7 = nn.Dense(self.fc_width, kernel_init=dense_init, **common)
        self.fc8 = nn.Dense(self.num_classes, kernel_init=dense_init, **common)
        self.dropout = nn.Dropout(self.dropout_rate)

    def _check_input(self, x: Array, exact: bool) -> None:
        size = self.image_size
        if x.ndim != 4:
            raise ValueError(
                f"VGG expects NHWC images of shape (batch, height, width, channels); "
                f"got an array of shape {x.shape}."
            )
        height, width = x.shape[1:3]
        if exact and (height, width) != (size, size):
            raise ValueError(
                f"{self.spec.name} was built for {size}x{size} inputs (image_size={size}) "
                f"but got {height}x{width}. Resize or crop to {size}x{size}, build the "
                f"model with image_size={height} if it is square, or use "
                f"method='score_map' for class score maps of larger images."
            )
        if not exact and min(height, width) < size:
            raise ValueError(
                f"score_map needs inputs of at least {size}x{size} (the training "
                f"resolution); got {height}x{width}."
            )

    def __call__(self, x: Array, train: bool = False) -> Array:
        """Logits (N, num_classes) for inputs at the training resolution."""
        self._check_input(x, exact=True)
        x, _ = self.features(x, train)
        x = self.dropout(nn.relu(self.fc6(x, dense=True)), deterministic=not train)
        x = self.dropout(nn.relu(self.fc7(x)), deterministic=not train)
        return self.fc8(x).astype(jnp.float32)

    def score_map(self, x: Array) -> Array:
        """Class score map (N, H', W', num_classes) for inputs of any size >= image_size."""
        self._check_input(x, exact=False)
        x, _ = self.features(x)
        return self._conv_head(x).astype(jnp.float32)

    def _conv_head(self, x: Array, captured: dict[str, Array] | None = None) -> Array:
        x = nn.relu(self.fc6(x, dense=False))
        if captured is not None:
            captured["fc6"] = x
        x = nn.relu(self.fc7(x))
        if captured is not None:
            captured["fc7"] = x
        return self.fc8(x)

    def extract(self, x: Array, names: Sequence[str]) -> dict[str, Array]:
        """Named activations in one forward pass, for inputs of any size.

        Conv-stage names as in `VGGFeatures`; 'fc6' and 'fc7' are the ReLU
        outputs of the head applied fully convolutionally (maps, not vectors),
        which needs inputs of at least image_size.
        """
        valid = set(self.layer_names())
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise ValueError(f"Unknown layer names {unknown}; valid: {self.layer_names()}.")
        wants_head = bool({"fc6", "fc7"} & set(names))
        if wants_head:
            self._check_input(x, exact=False)
        x, captured = self.features(x, capture=names)
        if wants_head:
            head: dict[str, Array] = {}
            self._conv_head(x, head)
            captured.update({k: v for k, v in head.items() if k in names})
        return {name: captured[name] for name in names}

    def layer_names(self) -> list[str]:
        """Names accepted by `extract`, in network order."""
        names = []
        for stage, kernels in enumerate(self.spec.stages):
            for i in range(len(kernels)):
                names += [f"conv{stage + 1}_{i + 1}", f"relu{stage + 1}_{i + 1}"]
                if self.spec.lrn and stage == 0 and i == 0:
                    names.append("lrn1")
            names.append(f"pool{stage + 1}")
        return names + ["fc6", "fc7"]


def create_model(name: str, num_classes: int = 1000, **options: Any) -> VGG:
    """Builds the VGG module for a config name ('vgg16', 'D', 'A-LRN', ...).

    Options: width_divisor (conv channel widths divided by it), fc_width,
    dropout_rate, image_size (training resolution), dtype (compute),
    param_dtype, initializer ('glorot' uniform or the paper's 'normal' N(0, 0.01)).
    Input channels are taken from the input.
    """
    spec = get_spec(name)
    unknown = sorted(set(options) - set(MODEL_OPTIONS))
    if unknown:
        hints = [difflib.get_close_matches(k, MODEL_OPTIONS, n=1) for k in unknown]
        said = ", ".join(
            f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "")
            for k, h in zip(unknown, hints, strict=True)
        )
        raise ValueError(
            f"Unknown model options {said}. Valid options: {', '.join(MODEL_OPTIONS)}."
        )
    if options.get("initializer", "glorot") not in INITIALIZERS:
        raise ValueError(
            f"Unknown initializer {options['initializer']!r}; choose one of {INITIALIZERS}."
        )
    for key in ("dtype", "param_dtype"):
        if isinstance(options.get(key), str):
            options[key] = jnp.dtype(options[key])
    return VGG(spec, num_classes=num_classes, **options)


# ---------------------------------------------------------------------------
# Costs computed from the layer specification.


@dataclasses.dataclass(frozen=True)
class ModelCost:
    name: str
    letter: str
    weight_layers: int
    params: int
    conv_params: int
    mult_adds: int


def model_cost(
    name: str,
    num_classes: int = 1000,
    image_size: int = 224,
    in_channels: int = 3,
    width_divisor: int = 1,
    fc_width: int = 4096,
) -> ModelCost:
    """Parameter count (BN scale and bias included) and multiply-adds per image."""
    spec = get_spec(name)
    size, channels = image_size, in_channels
    params = conv_params = mult_adds = 0
    for stage, kernels in enumerate(spec.stages):
        width = max(1, STAGE_WIDTHS[stage] // width_divisor)
        for k in kernels:
            weights = k * k * channels * width
            conv_params += weights + width + (2 * width if spec.batch_norm else 0)
            mult_adds += weights * size * size
            channels = width
        size //= 2
    fc_in = size * size * channels
    head = [(fc_in, fc_width), (fc_width, fc_width), (fc_width, num_classes)]
    fc_params = sum(i * o + o for i, o in head)
    mult_adds += sum(i * o for i, o in head)
    params = conv_params + fc_params
    return ModelCost(spec.name, spec.letter, spec.num_weight_layers, params, conv_params, mult_adds)


def format_table(names: Iterable[str] = SPECS, image_size: int = 224) -> str:
    """A Markdown table of layers, parameters and multiply-adds for the configs."""
    rows = [
        "| name | paper | weight layers | parameters | conv parameters | mult-adds |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        c = model_cost(name, image_size=image_size)
        rows.append(
            f"| {c.name} | {c.letter} | {c.weight_layers} | {c.params:,} | "
            f"{c.conv_params:,} | {c.mult_adds / 1e9:.3f} G |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    from vgg_jax import cli

    def _main() -> None:
        print("VGG configurations at 224x224, 1000 classes (python -m vgg_jax.models)\n")
        print(format_table())

    cli.run(_main)
