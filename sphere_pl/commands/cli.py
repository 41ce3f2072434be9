"""`python -m sphere_pl` / `sphere-pl`: every command, one way of taking arguments, one way of failing.

    sphere-pl fit --config configs/quickstart.yaml [--ckpt_path runs/quickstart/checkpoints/last.ckpt]
    sphere-pl validate --config configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/last.ckpt
    sphere-pl test --config configs/quickstart.yaml --patch edits.safetensors
    sphere-pl export --ckpt_path last.ckpt --out edits.safetensors
    sphere-pl apply --patch edits.safetensors --model MODEL --out edited-model/
    sphere-pl rollback --ckpt_path last.ckpt --batches 1
    sphere-pl study --config benchmarks/studies/long_horizon.yaml

fit, validate and test are a LightningCLI over the sequential editor and the edit data; export,
apply, rollback (`patches.py`) and study (`study/`) are jsonargparse parsers too: every command
takes `--config FILE` and `--print_config`. An error sphere_pl raises on purpose (`SpherePLError`)
or a refused argument ends with one line saying what, one saying what to do, and no traceback
(`SPHERE_PL_TRACEBACK=1` shows it); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from argparse import ArgumentError

from lightning.pytorch.utilities.exceptions import SIGTERMException

from .refusals import hint_for, one_line, refused_by_sphere_pl

SIGTERM_EXIT = 128 + 15  # the shell's status for a process ended by SIGTERM
USAGE_EXIT = 2  # a refused argument, as argparse exits
INTERRUPT_EXIT = 128 + 2  # the shell's status for a process ended by SIGINT (Ctrl-C)

HELP = """usage: python -m sphere_pl COMMAND [options]      (installed: sphere-pl COMMAND [options])

Sequential knowledge editing of language models: SPHERE and the methods it improves
(AlphaEdit, MEMIT, ROME, FT, RECT, PRUNE), batch after batch of edits.

commands:
  fit        apply a stream of edit batches to a model, with a checkpoint after every batch, HE and
             editing metrics logged; --ckpt_path resumes an interrupted run
  validate   score the edited facts of a checkpoint (--ckpt_path) or an exported patch (--patch)
  test       score the never-edited facts and the general-ability tasks of a checkpoint or patch
  export     write the edits of a checkpoint as a patch file (safetensors)
  apply      write a patch into a clean copy of the model, saved as a standard Hugging Face model
  rollback   undo the last N edit batches of a checkpoint, exactly
  study      run one edit stream with several variants (method x filters x settings), each a real
             fit in its own folder, resumable; a report table and plots of them side by side

`python -m sphere_pl COMMAND --help` lists a command's options, `COMMAND --print_config` every setting.
example: python -m sphere_pl fit --config configs/quickstart.yaml
"""


def main(args: list[str] | None = None):
    """Run one command; see the module docstring for how it fails."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv in ([], ["-h"], ["--help"]):
        print(HELP, end="")
        return None
    _show_progress_messages()
    command = argv[0]
    try:
        if command == "study":
            from .study import main as study_main

            return sys.exit(study_main(argv[1:]))
        if command in ("export", "apply", "rollback"):
            from .patches import main as patches_main

            return patches_main(argv)
        from .run import run_lightning

        return run_lightning(None if args is None else argv)
    except SIGTERMException:  # Lightning ends a run stopped by SIGTERM with SystemExit(None), i.e. status 0
        print("error: stopped by SIGTERM before the end of the run: the batches finished before it are checkpointed\n"
              "hint: run the same command with --ckpt_path <checkpoint.dirpath>/last.ckpt to resume it "
              f"(exit status {SIGTERM_EXIT}, so that a scheduler requeues the job)", file=sys.stderr)
        raise SystemExit(SIGTERM_EXIT) from None
    except SystemExit as e:
        if isinstance(e.__context__, KeyboardInterrupt):  # Lightning's shutdown after Ctrl-C exits 1 (the checkpoint callback said where to resume)
            print("error: stopped by Ctrl-C before the end of the run: the batches finished before it are checkpointed\n"
                  "hint: run the same command with --ckpt_path <checkpoint.dirpath>/last.ckpt to resume it", file=sys.stderr)
            raise SystemExit(INTERRUPT_EXIT) from None
        raise
    except ArgumentError as e:
        if os.environ.get("SPHERE_PL_TRACEBACK"):
            raise
        print(f"error: {one_line(e)}\nhint: `python -m sphere_pl {command} --help` lists the options, "
              f"`{command} --print_config` every setting and its value", file=sys.stderr)
        raise SystemExit(USAGE_EXIT) from None
    except Exception as e:
        own = refused_by_sphere_pl(e)
        if own is None or os.environ.get("SPHERE_PL_TRACEBACK"):
            raise
        raise SystemExit(f"error: {one_line(own)}\nhint: {hint_for(own)}") from None


def _show_progress_messages() -> None:
    """sphere_pl's own INFO messages (the value search's memory plan, statistics progress) on stderr, as
    Lightning shows its own; a handler already configured by the user is left alone. Lightning's note that
    the one epoch ended says nothing to an editing run and is left out."""
    logger = logging.getLogger("sphere_pl")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("sphere_pl: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_EpochEndFilter())


class _EpochEndFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("`Trainer.fit` stopped: `max_epochs=")
