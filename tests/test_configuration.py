"""vgg_jax.configuration: loading from any directory, task schemas, explaining, resume checks."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import ml_collections
import pytest

from vgg_jax import configuration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
LOCALIZE = os.path.join(CONFIGS, "localize_fashion_mnist.py")


def _config(name: str) -> ml_collections.ConfigDict:
    return configuration.load_config_file(os.path.join(CONFIGS, name))


def _stored(config: ml_collections.ConfigDict) -> dict:
    """What a run's config.json holds, read back."""
    return configuration.as_json(config)


@pytest.fixture
def no_project_on_path(monkeypatch, tmp_path):
    """Another working directory, the checkout off sys.path and no configs imported yet."""
    monkeypatch.chdir(tmp_path)
    kept = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]
    monkeypatch.setattr(sys, "path", kept)
    for name in [n for n in sys.modules if n.split(".")[0] == "configs"]:
        monkeypatch.delitem(sys.modules, name)


# ---------------------------------------------------------------------------
# Loading.


def test_missing_config_file_names_it_and_the_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.py not found; pass another"):
        configuration.load_config_file(str(tmp_path / "nope.py:384"), "; pass another")


def test_experiment_files_import_their_base_from_any_directory(no_project_on_path):
    config = configuration.load_config_file(os.path.join(CONFIGS, "vgg16.py:384"))
    assert (config.model, config.train_scale_min, config.learning_rate) == ("vgg16", 384, 1e-3)
    assert sys.modules["configs"].__path__[0] == CONFIGS


def test_a_config_outside_the_checkout_can_import_the_configs_package(no_project_on_path):
    path = os.path.join(os.getcwd(), "mine.py")
    with open(path, "w") as f:
        f.write("from configs import paper\n\n\ndef get_config():\n")
        f.write("    c = paper.paper_config('vgg13', None)\n    c.num_epochs = 2\n    return c\n")
    config = configuration.load_config_file(path)
    assert (config.model, config.num_epochs) == ("vgg13", 2)


def test_config_flag_finds_the_configs_package_from_another_directory(tmp_path):
    # The absl --config flag (ml_collections executes the file while parsing): the
    # checkout is taken off sys.path once vgg_jax is imported, so only parse_flags can
    # make `from configs import paper` work.
    script = (
        "import os, sys\n"
        "from absl import flags\n"
        "from ml_collections import config_flags\n"
        "from vgg_jax import configuration\n"
        f"root = {ROOT!r}\n"
        "sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]\n"
        "config_flags.DEFINE_config_file('config')\n"
        f"configuration.parse_flags(['prog', '--config', {CONFIGS + '/vgg19.py:jitter'!r}])\n"
        "print(flags.FLAGS.config.model, flags.FLAGS.config.train_scale_max)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["vgg19", "512"]


# ---------------------------------------------------------------------------
# Validation and task schemas.


def test_config_typo_names_the_nearest_field():
    config = _config("fashion_mnist.py:quick")
    config.learning_rte = 0.1
    with pytest.raises(ValueError, match=r"'learning_rte'.*Did you mean 'learning_rate'"):
        configuration.validate_config(config)


def test_impossible_values_are_named():
    config = _config("vgg11.py")
    config.batch_size = 100
    config.grad_accum_steps = 3
    with pytest.raises(ValueError, match=r"batch_size=100 is not a multiple"):
        configuration.validate_config(config)
    config = _config("vgg11.py")
    config.schedule = "linear"
    with pytest.raises(ValueError, match=r"schedule='linear'; choose one of"):
        configuration.validate_config(config)


@pytest.mark.parametrize(
    "field, value, wording",
    [
        ("width_divisor", 0, ">= 1"),  # was a ZeroDivisionError in the model
        ("fc_width", 0, ">= 1"),
        ("num_classes", 0, ">= 1"),
        ("checkpoint_every_steps", 0, ">= 1"),  # was a ZeroDivisionError in the loop
        ("eval_batch_size", -3, ">= 1"),  # failed only at the first evaluation
        ("eval_every_epochs", 0, ">= 1"),
        ("keep_checkpoints", 0, ">= 1"),  # nothing to resume from
        ("shuffle_buffer", 0, ">= 1"),
        ("seed", -1, ">= 0"),
        ("max_steps", -5, ">= 0"),
        ("weight_decay", -1.0, ">= 0"),
        ("warmup_epochs", -1.0, ">= 0"),
        ("dropout_rate", 1.5, "in [0, 1)"),  # trained on nonsense before
        ("dropout_rate", 1.0, "in [0, 1)"),
        ("momentum", 2.0, "in [0, 1)"),
        ("momentum", float("nan"), "in [0, 1)"),
        ("plateau_factor", 1.0, "in (0, 1)"),
        ("step_factor", 0.0, "in (0, 1]"),
        ("value_range", 0.0, "> 0"),
        ("divergence_factor", 0.5, "0 (off) or > 1"),  # would stop every run at once
        ("learning_rate", float("nan"), "positive"),
    ],
)
def test_every_number_out_of_its_range_is_refused_naming_field_and_range(field, value, wording):
    config = _config("fashion_mnist.py:quick")
    config[field] = value
    with pytest.raises(ValueError, match=rf"config\.{field} must be {re.escape(wording)}"):
        configuration.validate_config(config)


def test_the_edges_of_each_range_are_accepted():
    config = _config("fashion_mnist.py:quick")
    edges = {"dropout_rate": 0.0, "momentum": 0.0, "step_factor": 1.0, "divergence_factor": 0.0,
             "max_steps": 0, "seed": 0, "weight_decay": 0.0, "eval_scale": 32,
             "test_scales": (32, 64)}  # fmt: skip
    for field, value in edges.items():
        config[field] = value
    configuration.validate_config(config)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"test_scales": (16,)}, "config.test_scales=(16,): every scale Q must be >= the "
         "training crop image_size=32"),  # failed after the whole run, at the test table
        ({"train_eval_scales": (64, 16)}, "config.train_eval_scales=(64, 16): every scale Q"),
        ({"eval_scale": 16}, "config.eval_scale=16: every scale Q"),
        ({"train_scale_min": 64, "train_scale_max": 48}, "Need image_size <= train_scale_min"),
    ],
)  # fmt: skip
def test_scales_below_the_training_crop_are_refused_before_training(overrides, message):
    config = _config("fashion_mnist.py:quick")
    for field, value in overrides.items():
        config[field] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        configuration.validate_config(config)


def test_localization_block_is_its_own_schema():
    config = configuration.load_config_file(LOCALIZE)
    assert configuration.task_of(config) == "localization"
    assert "localization" not in configuration.EXTRA_FIELDS
    configuration.validate_config(config, task="localization")
    config.localization.hed = "pcr"
    for task in ("localization", "classification"):  # refused whichever command reads it
        with pytest.raises(ValueError, match=r"'localization\.hed'.*'localization\.head'"):
            configuration.validate_config(config, task=task)


def test_localization_values_and_missing_block_are_refused():
    config = configuration.load_config_file(LOCALIZE)
    config.localization.head = "per-class"
    with pytest.raises(ValueError, match=r"localization\.head='per-class'; choose one of"):
        configuration.validate_config(config, task="localization")
    with pytest.raises(ValueError, match=r"no 'localization' field; start from configs/"):
        configuration.validate_config(_config("vgg11.py"), task="localization")
    with pytest.raises(ValueError, match=r"Unknown task 'segmentation'"):
        configuration.validate_config(_config("vgg11.py"), task="segmentation")


def test_a_registered_schema_is_accepted_and_checked(monkeypatch):
    monkeypatch.setattr(configuration, "SCHEMAS", dict(configuration.SCHEMAS))

    def defaults():
        return ml_collections.ConfigDict({"iou": 0.5})

    def validate(config):
        if not 0 < config.probe.iou < 1:
            raise ValueError("config.probe.iou must lie in (0, 1).")

    configuration.register_schema("probe", defaults, validate)
    with pytest.raises(ValueError, match="cannot name a task schema"):
        configuration.register_schema("model", defaults, validate)  # a top-level field
    config = _config("vgg11.py")
    config.probe = defaults()
    configuration.validate_config(config)  # known as a block, not an unknown field
    config.probe.iou = 2.0
    with pytest.raises(ValueError, match=r"probe\.iou must lie"):
        configuration.validate_config(config, task="probe")
    assert configuration.task_of(config) == "probe"


# ---------------------------------------------------------------------------
# Explaining.


def test_explain_marks_the_fields_that_differ_from_the_defaults():
    lines = configuration.explain(_config("vgg16.py:384"))
    assert "* learning_rate = 0.001" in lines and "* init_from = 'runs/vgg16_256'" in lines
    assert "  momentum = 0.9" in lines  # the default, unmarked
    loc_lines = configuration.explain(configuration.load_config_file(LOCALIZE + ":pcr"))
    assert "* localization.head = 'pcr'" in loc_lines
    assert "  localization.fine_tune = 'all'" in loc_lines


def test_explain_command_prints_the_config_and_refuses_a_bad_one_in_a_line(tmp_path, capsys):
    # `python -m vgg_jax.configuration FILE` is main([FILE]); run in-process (fast).
    assert configuration.main([os.path.join(CONFIGS, "vgg11.py:jitter")]) == 0
    out = capsys.readouterr().out
    assert "* train_scale_max = 512" in out and "valid" in out
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from configs import default\n\n\ndef get_config():\n"
        "    c = default.get_config()\n    c.lerning_rate = 0.1\n    return c\n"
    )
    assert configuration.main([str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'lerning_rate'" in err and "'learning_rate'" in err
    assert configuration.main([str(tmp_path / "none.py")]) == 1
    assert "none.py not found" in capsys.readouterr().err


def test_explain_shows_an_experiment_holding_a_training_config(capsys):
    path = os.path.join(CONFIGS, "transfer_fashion_mnist.py:tiny")
    assert configuration.main([path]) == 0
    out = capsys.readouterr().out
    assert "# source: task classification" in out and "* source.model = 'vgg11_bn'" in out
    assert "# other fields" in out and "transfer.target_classes" in out


def test_the_command_checks_a_task_block_as_the_package_does():
    # Run as `python -m`, the module is loaded twice (as __main__ and as the package's);
    # the localisation block's schema is registered in the package's copy only.
    env = {**os.environ, "PYTHONPATH": ROOT}
    for argv in ([os.path.join(CONFIGS, "localize_fashion_mnist.py:tiny")], ["--help"]):
        done = subprocess.run([sys.executable, "-m", "vgg_jax.configuration", *argv], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert "checks it: exit 1 if invalid" in done.stdout


# ---------------------------------------------------------------------------
# Resume compatibility.


def test_resume_refuses_another_model_naming_it_and_the_way_out():
    stored = _stored(_config("vgg11.py"))
    new = _config("vgg11.py")
    new.model = "vgg11_lrn"
    with pytest.raises(ValueError, match=r"model: 'vgg11' -> 'vgg11_lrn'") as e:
        configuration.check_resume(stored, new, "runs/a")
    assert "runs/a" in str(e.value) and "--workdir" in str(e.value)
    assert "--config.resume_override=True" in str(e.value) and "\n" not in str(e.value)


def test_resume_accepts_the_same_config_and_a_longer_run():
    stored = _stored(_config("vgg11.py"))
    assert configuration.check_resume(stored, _config("vgg11.py")) == []
    new = _config("vgg11.py")
    new.num_epochs = 80
    new.log_every_steps = 10
    new.process_id = 1  # each process of a multi-host run compares with process 0's file
    changes = configuration.check_resume(stored, new)
    assert "num_epochs: 74 -> 80" in changes and len(changes) == 3


def test_resume_override_accepts_any_difference_and_reports_it():
    stored = _stored(_config("vgg11.py"))
    new = _config("vgg11.py")
    new.model = "vgg11_lrn"
    new.resume_override = True
    changes = configuration.check_resume(stored, new)
    assert "model: 'vgg11' -> 'vgg11_lrn'" in changes


def test_resume_refuses_a_changed_localization_field_by_its_dotted_name():
    stored = _stored(configuration.load_config_file(LOCALIZE))
    new = configuration.load_config_file(LOCALIZE)
    new.localization.head = "pcr"
    new.localization.dense_scales = (32, 64)  # protocol (2) only: may change
    with pytest.raises(ValueError, match=r"localization\.head: 'scr' -> 'pcr'") as e:
        configuration.check_resume(stored, new)
    assert "dense_scales" not in str(e.value)
    new.localization.head = "scr"
    assert configuration.check_resume(stored, new) == [
        "localization.dense_scales: [32] -> [32, 64]"
    ]


def test_resume_length_sets_the_cosine_schedule_so_it_is_refused_there():
    config = _config("fashion_mnist.py:quick")
    config.schedule = "cosine"
    new = ml_collections.ConfigDict(config.to_dict())
    new.num_epochs = config.num_epochs + 1
    with pytest.raises(ValueError, match=r"schedule='cosine'.*num_epochs"):
        configuration.check_resume(_stored(config), new)


def test_resume_treats_a_field_added_since_the_run_at_its_default_as_unchanged():
    stored = _stored(_config("vgg11.py"))
    del stored["resume_override"], stored["cache"]
    assert configuration.check_resume(stored, _config("vgg11.py")) == []
    new = _config("vgg11.py")
    new.cache = True  # not the default the run had: a difference
    with pytest.raises(ValueError, match=r"cache: False -> True"):
        configuration.check_resume(stored, new)


def test_resume_refuses_a_localization_block_the_run_did_not_have():
    classification = _config("vgg11.py")
    new = _config("vgg11.py")
    new.localization = configuration.schemas()["localization"].defaults()
    with pytest.raises(ValueError, match=r"localization\.head: \(absent\) -> 'scr'"):
        configuration.check_resume(_stored(classification), new)


def test_every_resumable_field_is_a_field_of_its_schema():
    fields = set(configuration.default_config().keys()) | set(configuration.EXTRA_FIELDS)
    assert set(configuration.RESUMABLE_FIELDS) <= fields
    for name, schema in configuration.schemas().items():
        assert set(schema.resumable) <= set(schema.defaults().keys()), name
