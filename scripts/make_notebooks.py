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
variant for its 4 epochs). The test suite runs this notebook with tiny
settings by overriding this cell.
"""),
        code(
            """
MODEL = "vgg16"           # any name of the table below, or a paper letter ("D")
WIDTH_DIVISOR = 1         # 1 = the paper's channel widths
FC_WIDTH = 4096           # units of FC1 and FC2
PHOTO_SMALLEST_SIDE = 384  # the paper's test scale Q for the dense evaluation
TRAIN_VARIANT = "quick"   # configs/fashion_mnist.py variant: 32x32 inputs, 4 epochs
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
import importlib.util as _util

from vgg_jax import train


def load_config(path, variant=None):
    spec = _util.spec_from_file_location("experiment_config", path)
    module = _util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


config = load_config(REPO_DIR / "configs" / "fashion_mnist.py", TRAIN_VARIANT)
config.update(TRAIN_OVERRIDES)
print(f"model {config.model}, {config.num_epochs} epochs, batch {config.batch_size}, "
      f"{config.image_size}x{config.image_size}, lr {config.learning_rate}")
result = train.train_and_evaluate(config, WORKDIR)
"""),
        markdown("""
## Curves

Training loss and accuracy as logged, test accuracy after each evaluation,
read back from `metrics.jsonl`.
"""),
        code("""
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


NOTEBOOK_CELLS = {"quickstart.ipynb": quickstart}


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
