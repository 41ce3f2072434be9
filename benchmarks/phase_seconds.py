"""Seconds by phase of a run so far, read from its checkpoint: a study variant still running has no
summary.json, and its exported rows carry no timings, yet its checkpoint records them.

    python benchmarks/phase_seconds.py ../studies/zsre-stream/alphaedit/checkpoints/last.ckpt [...]

Prints each phase's seconds, editing and measuring per edit, and measuring's share of the two (issue 30's
budget: under 15 %).
"""

from __future__ import annotations

import argparse

from sphere_pl.commands.study.report import MEASURING_PHASES, ONE_OFF_PHASES
from sphere_pl.files import load_checkpoint_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="checkpoint files (last.ckpt of each run)")
    for path in parser.parse_args().checkpoints:
        state = load_checkpoint_file(path)["sphere_pl"]
        seconds, edits = state["seconds"], state["edits_applied"]
        # split as the study report splits a finished run's summary
        editing = sum(v for k, v in seconds.items() if k not in MEASURING_PHASES + ONE_OFF_PHASES)
        measuring = sum(v for k, v in seconds.items() if k in MEASURING_PHASES)
        print(f"{path}: {edits} edits in the weights; seconds by phase: " + ", ".join(f"{k} {x:.1f}" for k, x in seconds.items()))
        print(f"  editing {editing:.0f} s ({editing / edits:.2f} s/edit), measuring {measuring:.0f} s ({measuring / edits:.2f} s/edit): "
              f"measuring is {100 * measuring / (editing + measuring):.0f} % of editing + measuring")


if __name__ == "__main__":
    main()
