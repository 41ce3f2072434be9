"""The commands: `python -m sphere_pl fit | validate | test` (`run.py`), `export | apply | rollback`
(`patches.py`) and `study` (`study/`), dispatched and given one way of failing by `cli.py`."""
