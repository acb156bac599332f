"""`python -m vgg_jax`: the commands, one line each (each has its own --help)."""

COMMANDS = (
    ("train", "train a network: --config configs/FILE.py[:variant] --workdir DIR"),
    ("evaluate", "the paper's test protocols (dense, multi-crop, both; ensembles) on a split"),
    ("predict", "top classes of image files, by weights name, bundle or training run"),
    ("score_map", "class score maps of an image over its whole area (PNG)"),
    ("features", "activations of named layers, or the paper's descriptor, of images (.npz)"),
    ("transfer", "linear-SVM transfer with the paper's image descriptor (Appendix B)"),
    ("localize", "train, evaluate or run the localisation network (Appendix A)"),
    ("convert", "torchvision / Keras weights to a bundle, or a bundle back to torchvision"),
    ("data_sources", "prepare a dataset once (ImageNet from its manual download)"),
    ("configuration", "print a config file with its non-default fields; exit 1 if invalid"),
    ("models", "the table of configurations A to E: layers, parameters, mult-adds"),
)


def main() -> None:
    print("vgg_jax commands (python -m vgg_jax.COMMAND --help for each):")
    for name, what in COMMANDS:
        print(f"  {name:<14} {what}")
    print("First steps: README.md (`make demo` trains the Fashion-MNIST experiment offline).")


if __name__ == "__main__":
    main()
