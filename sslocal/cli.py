"""`sslocal train|evaluate|prepare|localize|convert|benchmark|study`: flags in, library calls out.

All logic lives in importable modules; this file only parses flags and reports user errors
(a missing file, a bad config value, ...) as one line and a non-zero exit, without a traceback
(SSLOCAL_DEBUG=1 shows it).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

# Each command: its usage line, what it does, and the flags it reads (its --help lists them).
COMMANDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "train": ("sslocal train --config FILE --workdir DIR [--config.FIELD=VALUE ...]",
              "train and evaluate per the config; resumes from DIR when it holds the run",
              ("config", "workdir", "coordinator_address", "num_processes", "process_id")),
    "evaluate": ("sslocal evaluate --config FILE --checkpoint PATH [--checkpoint PATH ...]",
                 "score workdirs, model directories or PyTorch files on the config's test sets",
                 ("config", "checkpoint", "which", "dataset", "ids", "ogl", "report",
                  "baselines", "out")),
    "prepare": ("sslocal prepare --dataset NAME/CONFIG --root DIR [--data_dir DIR] [--verify]",
                "build a dataset's ArrayRecord files once, with a manifest of what was missing; "
                "--verify checks a prepared one against its manifest",
                ("dataset", "root", "data_dir", "overwrite", "verify", "config")),
    "localize": ("sslocal localize --checkpoint PATH (--video FILE | --image FILE --audio FILE) "
                 "--out DIR", "heatmaps of where the sound comes from, on your own clips",
                 ("checkpoint", "video", "image", "audio", "every", "ogl", "out", "config")),
    "convert": ("sslocal convert IN.pth OUT_DIR [--format auto|ezvsl|lvs|slavc|ssltie] "
                "[--momentum]", "a released PyTorch checkpoint (EZ-VSL, FNAC, marginNCE, LVS, "
                "SLAVC, SSL-TIE) -> an sslocal model directory", ("format", "momentum")),
    "benchmark": ("sslocal benchmark {step|input|e2e} --config FILE [--dataset NAME] [--out P]",
                  "throughput of the train step, the input pipeline, or both",
                  ("config", "dataset", "out")),
    "study": ("sslocal study {margin|seeds} --config FILE --workdir DIR [--margins=...] "
              "[--seeds=N] [--dataset NAME]", "seeds: one config over N seeds (mean, std, "
              "min); margin: the margin study (Table 6) with paired seeds on synthetic data with "
              "noisy correspondence (--dataset synthetic_av/small: the clean comparison)",
              ("config", "workdir", "margins", "seeds", "dataset")),
}
USAGE = (f"usage: sslocal {{{'|'.join(COMMANDS)}}} [flags]   (sslocal COMMAND --help for its "
         "flags)")

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)",
                                          lock_config=True)
flags.DEFINE_string("workdir", None, "train: where checkpoints, metrics and reports go")
flags.DEFINE_string("coordinator_address", "", "multi-host GPU: host:port of process 0")
flags.DEFINE_integer("num_processes", 0, "multi-host GPU: number of processes")
flags.DEFINE_integer("process_id", -1, "multi-host GPU: this process's index")
flags.DEFINE_multi_string("checkpoint", [], "evaluate/localize: a workdir or a model directory "
                          "(repeat to compare several models side by side)")
flags.DEFINE_enum("which", "best", ["best", "latest"], "evaluate: in a training workdir, "
                  "its best checkpoint (by cIoU) or its latest (the last epoch)")
flags.DEFINE_bool("ogl", False, "evaluate/localize: also the object-guided (OGL) maps")
flags.DEFINE_bool("report", False, "evaluate: write report.html with plots and overlays")
flags.DEFINE_bool("baselines", False, "evaluate: also centre / random / oracle maps and the "
                  "untrained model")
flags.DEFINE_string("out", None, "evaluate/localize/benchmark: output directory")
flags.DEFINE_string("dataset", None, "TFDS name/config: prepare's and benchmark's input, "
                    "evaluate's test sets (several, comma-separated), study margin's data")
flags.DEFINE_string("root", None, "prepare: the raw data root (frames/, audio/, ...)")
flags.DEFINE_string("data_dir", None, "prepare: where TFDS datasets live (default: config's)")
flags.DEFINE_bool("overwrite", False, "prepare: rebuild a dataset that is already prepared")
flags.DEFINE_bool("verify", False, "prepare: check the prepared dataset against its manifest "
                  "(record counts, each shard's size and sha256) instead of building it")
flags.DEFINE_string("ids", None, "evaluate: a file of clip ids (one a line): score that subset "
                    "of each test set (named in every result)")
flags.DEFINE_string("video", None, "localize: a video file")
flags.DEFINE_string("image", None, "localize: an image file (with --audio)")
flags.DEFINE_string("audio", None, "localize: an audio file (with --image)")
flags.DEFINE_float("every", 1.0, "localize: seconds between the steps of a video")
flags.DEFINE_list("margins", ["0.2", "0", "-0.1", "-0.2", "-0.3", "-0.4"], "study margin: margins")
flags.DEFINE_integer("seeds", 3, "study: seeds (per margin)")
flags.DEFINE_string("format", "auto", "convert: the file's layout (auto: recognised from its "
                    "keys; ezvsl also reads FNAC and marginNCE files)")
flags.DEFINE_bool("momentum", False, "convert: SLAVC: take the momentum encoders (its test.py "
                  "--use_mom_eval) instead of the online ones")
FLAGS = flags.FLAGS
# 128 + SIGTERM: what a shell reports for a process that SIGTERM ended. A preempted run saves
# and exits with it, so that schedulers (SLURM --requeue, job retries) see an unfinished job.
PREEMPTED_EXIT_CODE = 143


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line, no traceback."""


def _config():
    if _CONFIG.value is None:
        raise UserError("--config is required (e.g. --config configs/synthetic.py)")
    return _CONFIG.value


def _require(name: str):
    value = getattr(FLAGS, name)
    if value in (None, [], ""):
        raise UserError(f"--{name} is required")
    return value


# Flags that name files or folders: each may be a local path or a gs:// URL.
PATH_FLAGS = ("workdir", "checkpoint", "out", "data_dir", "video", "image", "audio")


def _check_paths(command: str, args: list[str]) -> None:
    """Every path the command was given, checked before anything runs: a gs:// one without the
    `gcs` extra is one line naming it (writers.check_paths)."""
    from sslocal.writers import check_paths

    names = COMMANDS[command][2]
    paths = []
    for name in names:
        if name in PATH_FLAGS:
            value = FLAGS[name].value
            paths += value if isinstance(value, list) else [value]
    if "config" in names and _CONFIG.value is not None:
        config = _CONFIG.value
        paths += [config.get("data_dir"), config.model.get("image_pretrained"),
                  config.get("eval", {}).get("ogl_weights")]
    if command == "convert":
        paths += args
    check_paths(*paths)


def _dispatch(command: str, args: list[str]) -> None:
    _check_paths(command, args)
    if command == "train":
        from sslocal import sharding, train

        sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id)
        results = train.train_and_evaluate(_config(), _require("workdir"))
        if "preempted_at_step" in results:
            print(f"sslocal train: SIGTERM: stopped after step {results['preempted_at_step']} "
                  f"with its checkpoint saved; the same command resumes", file=sys.stderr)
            sys.exit(PREEMPTED_EXIT_CODE)
    elif command == "evaluate":
        from sslocal import evaluate

        evaluate.main(_config(), _require("checkpoint"), ogl=FLAGS.ogl, report=FLAGS.report,
                      out=FLAGS.out, dataset=FLAGS.dataset, baselines=FLAGS.baselines,
                      ids=FLAGS.ids, which=FLAGS.which)
    elif command == "prepare":
        from sslocal.data import prepare

        data_dir = FLAGS.data_dir or (_CONFIG.value.data_dir if _CONFIG.value else None)
        if FLAGS.verify:
            prepare.verify(_require("dataset"), data_dir=data_dir)
        else:
            prepare.prepare(_require("dataset"), root=FLAGS.root, data_dir=data_dir,
                            overwrite=FLAGS.overwrite)
    elif command == "localize":
        from sslocal import localize

        localize.main(checkpoint=_require("checkpoint")[0], video=FLAGS.video,
                      image=FLAGS.image, audio=FLAGS.audio, every=FLAGS.every, ogl=FLAGS.ogl,
                      out=_require("out"), config=_CONFIG.value)
    elif command == "convert":
        from sslocal.models import factory

        if len(args) != 2:
            raise UserError(f"usage: {COMMANDS['convert'][0]}")
        factory.convert_checkpoint(args[0], args[1], format=FLAGS.format,
                                   momentum=FLAGS.momentum)
    elif command == "benchmark":
        from sslocal import benchmark

        if len(args) != 1 or args[0] not in benchmark.KINDS:
            kinds = "|".join(benchmark.KINDS)
            raise UserError(f"usage: sslocal benchmark {{{kinds}}} --config ...")
        benchmark.main(args[0], _config(), out=FLAGS.out, dataset=FLAGS.dataset)
    elif command == "study":
        from sslocal import study

        if args == ["margin"]:
            study.margin_study(_config(), [float(m) for m in FLAGS.margins], FLAGS.seeds,
                               _require("workdir"), dataset=FLAGS.dataset or study.STUDY_DATASET)
        elif args == ["seeds"]:
            study.seed_study(_config(), FLAGS.seeds, _require("workdir"))
        else:
            raise UserError("usage: sslocal study {margin|seeds} --config ... --seeds=N "
                            "--workdir DIR")


def _add_config_dir_to_path(argv: list[str]) -> None:
    """Experiment configs import `configs.default`: make the folder holding configs/ importable."""
    for i, arg in enumerate(argv):
        path = None
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        if path:
            sys.path.insert(0, str(Path(path.split(":")[0]).absolute().parent.parent))


def command_help(command: str) -> str:
    """`sslocal COMMAND --help`: the usage, what it does, its flags (and, for prepare and
    evaluate, the dataset names)."""
    usage, what, names = COMMANDS[command]
    lines = [f"usage: {usage}", "", what, ""]
    for name in names:
        flag = FLAGS[name]
        default = "" if flag.default in (None, [], "", False) else f" (default: {flag.default})"
        lines.append(f"  --{name:<20} {flag.help}{default}")
    if "config" in names:
        lines.append(f"  {'--config.FIELD=VALUE':<22} override any field of the config file "
                     "(a mistyped field fails)")
    if command in ("prepare", "evaluate", "benchmark"):
        from sslocal.data import builders

        lines += ["", "datasets (--dataset): " + ", ".join(sorted(builders.DATASETS))]
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> None:
    """Console entry point."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        sys.exit(0 if len(argv) > 1 and argv[1] in ("-h", "--help") else 2)
    command = argv.pop(1)
    if any(arg in ("-h", "--help", "--helpshort", "-help") for arg in argv[1:]):
        print(command_help(command))
        sys.exit(0)
    _add_config_dir_to_path(argv)

    def main(args: list[str]) -> None:
        logging.getLogger().setLevel(logging.WARNING)  # Orbax and TFDS are chatty at INFO
        logging.getLogger("sslocal").setLevel(logging.INFO)
        try:
            _dispatch(command, args[1:])
        # OSError: a missing file, a full disk (checkpointing.CheckpointSpaceError), a workdir
        # another run holds (checkpointing.WorkdirBusyError), a permission.
        except (UserError, ValueError, OSError, FloatingPointError, ImportError) as error:
            if os.environ.get("SSLOCAL_DEBUG"):
                raise
            print(f"sslocal {command}: error: {error}", file=sys.stderr)
            sys.exit(1)

    def parse_flags(args: list[str]) -> list[str]:
        try:
            return app.parse_flags_with_usage(args)
        except (AttributeError, KeyError) as error:  # a --config.* field the config lacks
            while error.args and isinstance(error.args[0], Exception):
                error = error.args[0]  # ml_collections wraps its KeyError in an AttributeError
            detail = " ".join(str(error.args[0] if error.args else error).split())
            print(f"sslocal {command}: error: no such config field: {detail}", file=sys.stderr)
            sys.exit(1)

    app.run(main, argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
