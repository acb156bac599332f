"""Writes notebooks/*.ipynb from the cell sources below (run it after editing them).

The notebooks are generated, not edited in Jupyter, so that their source stays
reviewable in diffs and they are stored without outputs. Each has a cell tagged
`parameters` (papermill's convention): tests/test_notebooks.py inserts a cell
after it with tiny settings and executes the notebook top to bottom.

    python scripts/make_notebooks.py          # rewrite notebooks/
    python scripts/make_notebooks.py --check  # exit 1 if notebooks/ is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat import v4

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
# The repository users install from; the lead replaces ORG when the project is published.
REPO_URL = "https://github.com/ORG/vgg_jax"
COLAB_URL = "https://colab.research.google.com/github/ORG/vgg_jax/blob/main/notebooks/{name}"
BADGE = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"

INSTALL = f'''\
# Installs vgg_jax from its repository when it is not importable yet (Colab);
# does nothing inside a checkout where vgg_jax is installed. configs/ is part
# of the source, not of the package, so the clone is kept for it.
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

REPO_URL = "{REPO_URL}"


def find_repo():
    for p in (Path.cwd(), Path.cwd().parent, Path("vgg_jax_src").resolve()):
        if (p / "configs" / "default.py").exists():
            return p
    return None


REPO_DIR = find_repo()
if REPO_DIR is None:
    subprocess.run(["git", "clone", "-q", "--depth", "1", REPO_URL, "vgg_jax_src"], check=True)
    REPO_DIR = find_repo()
if importlib.util.find_spec("vgg_jax") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", str(REPO_DIR)], check=True)
    importlib.invalidate_caches()
import vgg_jax  # noqa: E402

print("vgg_jax from", Path(vgg_jax.__file__).parent, "| configs from", REPO_DIR / "configs")
'''

DEVICES = """\
import jax
import jax.numpy as jnp
import numpy as np
import matplotlib.pyplot as plt

print("JAX", jax.__version__, "on", jax.devices())
"""


def code(source: str, tags: tuple[str, ...] = ()) -> nbformat.NotebookNode:
    cell = v4.new_code_cell(source.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def markdown(source: str) -> nbformat.NotebookNode:
    return v4.new_markdown_cell(source.strip("\n"))


def quickstart() -> list[nbformat.NotebookNode]:
    name = "quickstart.ipynb"
    return [
        markdown(f"""
# vgg_jax quickstart

{BADGE.format(url=COLAB_URL.format(name=name))}

The VGG networks of Simonyan & Zisserman (ICLR 2015) in JAX and Flax. This
notebook installs `vgg_jax`, prints the table of the paper's configurations,
builds VGG16 (configuration D), scores a photograph *densely* (the paper's
fully-convolutional evaluation, which gives a map of class scores for an
image of any size) and trains the small Fashion-MNIST experiment, plotting
its curves. It runs on whatever Colab gives (CPU, GPU or TPU); *Runtime ->
Change runtime type* selects the accelerator.
"""),
        code(INSTALL),
        markdown("""
## Settings

The defaults are the real thing (full-width VGG16, the Fashion-MNIST quick
variant for its 2 epochs). The test suite runs this notebook with tiny
settings by overriding this cell.
"""),
        code(
            """
MODEL = "vgg16"           # any name of the table below, or a paper letter ("D")
WIDTH_DIVISOR = 1         # 1 = the paper's channel widths
FC_WIDTH = 4096           # units of FC1 and FC2
PHOTO_SMALLEST_SIDE = 384  # the paper's test scale Q for the dense evaluation
TRAIN_VARIANT = "quick"   # configs/fashion_mnist.py variant: 32x32 inputs, 2 epochs
TRAIN_OVERRIDES = {}      # config fields to change, e.g. {"num_epochs": 2}
WORKDIR = "runs/fashion_mnist_quick"
""",
            tags=("parameters",),
        ),
        code(DEVICES),
        markdown("""
## The configurations

Computed from the layer specification: weight layers, parameters, and
multiply-adds for one 224x224 image.
"""),
        code("""
from vgg_jax import models

print(models.format_table())
"""),
        markdown("""
## VGG16

`create_model` builds any configuration; `init` creates its parameters.
FC1 is stored as a 7x7 window over the last feature map, so the same
parameters serve the usual 224x224 classifier and the dense evaluation.
"""),
        code("""
model = models.create_model(MODEL, width_divisor=WIDTH_DIVISOR, fc_width=FC_WIDTH)
variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
num_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
print(f"{MODEL}: {num_params:,} parameters")
for name, layer in variables["params"]["features"].items():
    print(f"  {name:8s} kernel {layer['kernel'].shape}")
for name in ("fc6", "fc7", "fc8"):
    print(f"  {name:8s} kernel {variables['params'][name]['kernel'].shape}")
"""),
        markdown("""
## Scoring a photograph densely

The paper's test protocol: rescale the image so that its smallest side is
Q, run the convolutional layers over the whole image and the FC layers as
convolutions, which gives a *class score map* with one vector of 1000
scores per position; averaging the map gives the image's scores.

**The weights here are random** (nothing is downloaded), so the classes
mean nothing yet: the cell shows the mechanism and the shapes.
`pretrained.ipynb` does the same with converted ImageNet weights.
"""),
        code("""
from skimage import data
from skimage.transform import resize

from vgg_jax import checkpoints

photo = data.chelsea()  # a real photograph (a cat), 300 x 451, from scikit-image
h, w = photo.shape[:2]
scale = PHOTO_SMALLEST_SIDE / min(h, w)
pixels = resize(photo, (round(h * scale), round(w * scale)), anti_aliasing=True)  # [0, 1]
x = checkpoints.Preprocessing()(jnp.asarray(pixels, jnp.float32)[None])  # minus ImageNet mean

score_map = jax.jit(lambda v, x: model.apply(v, x, method="score_map"))(variables, x)
scores = score_map.mean(axis=(1, 2))[0]  # spatial average: the image's class scores
top = int(jnp.argmax(scores))
print("input", x.shape, "-> class score map", score_map.shape, "| top class", top)

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
axes[0].imshow(pixels)
axes[0].set_title(f"input, smallest side {PHOTO_SMALLEST_SIDE}")
im = axes[1].imshow(np.asarray(score_map[0, :, :, top]), cmap="magma")
axes[1].set_title(f"score map of class {top} ({score_map.shape[1]}x{score_map.shape[2]})")
fig.colorbar(im, ax=axes[1])
for ax in axes:
    ax.axis("off")
plt.show()
"""),
        markdown("""
## Training the Fashion-MNIST experiment

`configs/fashion_mnist.py:quick` is the seed experiment (VGG-A with a
quarter of the channels, 10 classes, one input channel) at 32x32, a few
epochs. `train_and_evaluate` is what `python -m vgg_jax.train` runs: a
sharded `jax.jit` train step over all devices, checkpoints in the workdir
(rerunning this cell resumes), metrics in `workdir/metrics.jsonl`.
tfds downloads Fashion-MNIST the first time.
"""),
        code("""
from vgg_jax import configuration, train

# get_config(TRAIN_VARIANT) of the experiment file, given as FILE.py:variant like --config.
experiment = REPO_DIR / "configs" / "fashion_mnist.py"
config = configuration.load_config_file(f"{experiment}:{TRAIN_VARIANT}")
config.update(TRAIN_OVERRIDES)
print(f"model {config.model}, {config.num_epochs} epochs, batch {config.batch_size}, "
      f"{config.image_size}x{config.image_size}, lr {config.learning_rate}")
result = train.train_and_evaluate(config, WORKDIR)
"""),
        markdown("""
## Curves

Training loss and accuracy as logged, test accuracy after each evaluation,
read back from `metrics.jsonl`. (The trainer also saves this figure as
`curves.png` in the workdir.)
"""),
        code("""
%matplotlib inline
import json

records = [json.loads(line) for line in open(Path(WORKDIR) / "metrics.jsonl")]
train_rows = [r for r in records if "train_loss" in r]
eval_rows = [r for r in records if "eval_top1_accuracy" in r]
print(f"{len(train_rows)} training records, {len(eval_rows)} evaluations")

fig, ax = plt.subplots(figsize=(7, 4))
ax.plot([r["epoch"] for r in train_rows], [r["train_loss"] for r in train_rows],
        label="train loss", color="tab:blue")
ax.set_xlabel("epoch")
ax.set_ylabel("loss")
acc = ax.twinx()
acc.plot([r["epoch"] for r in train_rows], [r["train_accuracy"] for r in train_rows],
         label="train accuracy", color="tab:orange", linestyle="--")
acc.plot([r["epoch"] for r in eval_rows], [r["eval_top1_accuracy"] for r in eval_rows],
         label="test accuracy", color="tab:green", marker="o")
acc.set_ylabel("accuracy")
acc.set_ylim(0, 1)
fig.legend(loc="center right")
plt.show()
if eval_rows:
    print(f"test accuracy after epoch {eval_rows[-1]['epoch']:.2f}: "
          f"{eval_rows[-1]['eval_top1_accuracy']:.4f}")
"""),
    ]


def pretrained() -> list[nbformat.NotebookNode]:
    name = "pretrained.ipynb"
    return [
        markdown(f"""
# Pretrained VGG weights in vgg_jax

{BADGE.format(url=COLAB_URL.format(name=name))}

Nobody trains VGG16 for three weeks to get ImageNet weights: they come from
torchvision or Keras. This notebook converts such a file into a `vgg_jax`
model bundle (the parameters plus the source framework's input
preprocessing, so the outputs are the source's), classifies a photograph,
looks at the convolutional features and computes a perceptual loss.

Where the weights come from (settings cell below):

* `WEIGHTS_FILE`: a file you have, e.g. uploaded to Colab (folder icon ->
  upload) or on Google Drive: torchvision `.pth`/`.safetensors`, Keras `.h5`
  or `.weights.h5`.
* otherwise `DOWNLOAD = "keras"` (528 MB, `keras.applications.VGG16(weights="imagenet")`)
  or `"torchvision"` (`vgg16-397923af.pth` from download.pytorch.org).
* `DOWNLOAD = None` builds a Keras VGG16 with **random** weights and saves
  it: the offline path the test suite takes. Everything runs the same, but
  the predicted classes then mean nothing.
"""),
        code(INSTALL),
        code(
            """
WEIGHTS_FILE = ""      # a torchvision or Keras VGG weights file; "" = download or build one
DOWNLOAD = "keras"     # "keras", "torchvision", or None (random Keras weights, offline)
WORK_DIR = "pretrained_weights"
FEATURE_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
""",
            tags=("parameters",),
        ),
        code(DEVICES),
        markdown("""
## Getting a weights file
"""),
        code("""
import os

os.makedirs(WORK_DIR, exist_ok=True)


def keras_vgg16_file(pretrained):
    import keras

    net = keras.applications.VGG16(weights="imagenet" if pretrained else None)
    stem = "vgg16_imagenet" if pretrained else "vgg16_random"
    path = os.path.join(WORK_DIR, stem + ".weights.h5")
    net.save_weights(path)
    keras.backend.clear_session()
    return path


def torchvision_vgg16_file():
    import urllib.request

    path = os.path.join(WORK_DIR, "vgg16-397923af.pth")
    if not os.path.exists(path):
        urllib.request.urlretrieve("https://download.pytorch.org/models/vgg16-397923af.pth", path)
    return path


if WEIGHTS_FILE:
    path = WEIGHTS_FILE
elif DOWNLOAD == "torchvision":
    path = torchvision_vgg16_file()
else:
    path = keras_vgg16_file(pretrained=DOWNLOAD == "keras")
PRETRAINED = bool(WEIGHTS_FILE) or DOWNLOAD is not None
print(f"weights: {path} ({os.path.getsize(path) / 2**20:.0f} MiB)",
      "" if PRETRAINED else "-- RANDOM weights: the classes below mean nothing")
"""),
        markdown("""
## Converting

`convert_file` recognises the format from the file's contents (never
unpickling anything), maps the layer names, reshapes FC1 into the 7x7
window of the dense head (torchvision flattens channel-major, Keras
channels-last) and records the preprocessing. `save_bundle` writes it as
JSON metadata plus an orbax checkpoint, loadable by `predict`, `evaluate`
and fine-tuning (`config.init_from`). The command line does the same:
`python -m vgg_jax.convert FILE --to DIR`.
"""),
        code("""
from vgg_jax import checkpoints, convert

bundle = convert.convert_file(path)
saved = checkpoints.save_bundle(os.path.join(WORK_DIR, "vgg16_bundle"), bundle)
bundle = checkpoints.load_bundle(saved)
model, variables = bundle.model, bundle.variables
print(bundle.name, bundle.options)
print("preprocessing:", bundle.preprocessing)
"""),
        markdown("""
## Classifying a photograph

The usual single crop: smallest side 256, the central 224x224, the
source's preprocessing, soft-max over the 1000 ImageNet classes: what
`python -m vgg_jax.predict IMAGE --weights DIR` prints.
"""),
        code("""
from skimage import data
from skimage.transform import resize

from vgg_jax import predict


def rescale(image, smallest_side):
    h, w = image.shape[:2]
    s = smallest_side / min(h, w)
    return resize(image, (round(h * s), round(w * s)), anti_aliasing=True).astype(np.float32)


photo = data.chelsea() / 255.0  # a real photograph (a cat) as RGB pixels in [0, 1]
crop = predict.central_crop(photo, bundle.image_size)  # smallest side 256, central 224x224
probs = predict.single_crop_probabilities(bundle, crop[None])[0]
names = predict.class_names(bundle)
top5 = predict.top_k(probs, names, k=5)
for index, name, p in top5:
    print(f"{p:7.2%}  {name}")

plt.figure(figsize=(4, 4))
plt.imshow(crop)
plt.title(top5[0][1])
plt.axis("off")
plt.show()
"""),
        markdown("""
## The whole image at once: a class score map

The same parameters applied fully convolutionally (the paper's dense
evaluation) to the whole photograph at smallest side 384: one score vector
per position. Averaging the map classifies the whole image.
"""),
        code("""
full = rescale(photo, 384)
score_map = jax.jit(lambda v, x: model.apply(v, x, method="score_map"))(
    variables, bundle.preprocessing(jnp.asarray(full)[None])
)
dense_probs = jax.nn.softmax(score_map.mean(axis=(1, 2))[0])
best = int(jnp.argmax(dense_probs))
print(f"score map {score_map.shape}; dense top-1: {names[best]}",
      f"({float(dense_probs[best]):.2%})")
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
axes[0].imshow(full)
axes[1].imshow(np.asarray(jax.nn.softmax(score_map[0], axis=-1)[..., best]), cmap="magma")
axes[1].set_title(f"P({names[best]}) per position")
for ax in axes:
    ax.axis("off")
plt.show()
"""),
        markdown("""
## Features

The activations of named layers (`conv1_1` ... `conv5_3`, `relu*`,
`pool1` ... `pool5`, `fc6`, `fc7`) in one forward pass, for any input size:
the usual inputs of transfer learning and style transfer. Shown: the mean
over channels of each layer's ReLU output.
"""),
        code("""
from vgg_jax.features import features, perceptual_loss

# With a bundle, images are RGB pixels in [0, 1]; its preprocessing is applied inside.
feats = features(bundle, None, rescale(photo, 224)[None], layers=FEATURE_LAYERS)
fig, axes = plt.subplots(1, len(FEATURE_LAYERS), figsize=(3 * len(FEATURE_LAYERS), 3))
for ax, name in zip(axes, FEATURE_LAYERS):
    f = feats[name][0]
    print(f"{name:8s} {tuple(f.shape)}")
    ax.imshow(np.asarray(f.mean(axis=-1)), cmap="viridis")
    ax.set_title(name)
    ax.axis("off")
plt.show()
"""),
        markdown("""
## Perceptual loss

The distance between two images' VGG features (Johnson et al. 2016 use
`relu2_2`; super-resolution and style-transfer work use several layers):
small for a slightly blurred copy, larger for a noisy one, although the
noisy copy can be closer in plain pixel distance.
"""),
        code("""
from skimage.filters import gaussian

image = rescale(photo, 224)
blurred = gaussian(image, sigma=1.0, channel_axis=-1).astype(np.float32)
rng = np.random.default_rng(0)
noisy = np.clip(image + rng.normal(0, 0.1, image.shape), 0, 1).astype(np.float32)

layers = ("relu2_2", "relu3_3", "relu4_3")
for label, other in (("blurred", blurred), ("noisy", noisy)):
    loss = perceptual_loss(bundle, None, image[None], other[None], layers=layers)
    pixel = float(np.mean((image - other) ** 2))
    print(f"{label:8s} perceptual {float(loss):.4f}   pixel MSE {pixel:.5f}")
"""),
    ]


NOTEBOOK_CELLS = {"quickstart.ipynb": quickstart, "pretrained.ipynb": pretrained}


def build(name: str) -> nbformat.NotebookNode:
    nb = v4.new_notebook()
    nb.cells = NOTEBOOK_CELLS[name]()
    kernel = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["kernelspec"] = kernel
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["colab"] = {"name": name, "provenance": []}
    nb.metadata["accelerator"] = "GPU"
    # Stable cell ids keep regenerated files identical when nothing changed.
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{Path(name).stem}-{i:02d}"
    nbformat.validate(nb)
    return nb


def render(name: str) -> str:
    return nbformat.writes(build(name), version=4) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if notebooks/ is stale")
    args = parser.parse_args(argv)
    stale = []
    for name in NOTEBOOK_CELLS:
        path = NOTEBOOKS / name
        text = render(name)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            NOTEBOOKS.mkdir(exist_ok=True)
            path.write_text(text)
            print("wrote", path.relative_to(ROOT))
    if stale:
        print("stale:", ", ".join(stale), "- run python scripts/make_notebooks.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
