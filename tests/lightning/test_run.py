"""End-to-end Lightning runs of the sequential editor on the tiny model.

Every test drives real `Trainer.fit` runs (tiny random LLaMA, small AlphaEdit on layers 1
and 2, three edit batches of four facts): resume equivalence, checkpoint contents, bad
data stopping the run before any edit, rollback of a non-finite update, the HE monitor,
the logged metrics, and the CLI with an offline W&B run. Expected values are computed
here independently of the code under test (pretrained weights reloaded from disk,
hyperspherical energy by brute force, evaluation sets derived from the data).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

from conftest import CONTEXT_TEMPLATES, CORPUS
from helpers import CrashBeforeBatch, SimulatedCrash, cli_env, run_cli
from sphere_pl import EditCheckpoint, EditDataModule, FactMonitor, HypersphericalEnergyMonitor, PretrainedModel, SequentialEditor
from sphere_pl.data.readers import EditSourceError
from sphere_pl.files import load_checkpoint_file
from sphere_pl.files.wandb_offline import find_offline_runs, read_offline_history
from sphere_pl.editing import NonFiniteUpdateError
from sphere_pl.evaluation.counterfact import CounterFactEvaluator
from sphere_pl.models import load_model_and_tokenizer
from sphere_pl.editing import EditFailedError
from sphere_pl.data.records import EditDataError

REPO = Path(__file__).resolve().parents[2]
NUM_EDITS = 4  # facts per edit batch
NUM_BATCHES = 3
NUM_FACTS = NUM_EDITS * NUM_BATCHES


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    """The tiny model gains nothing from threads; on a busy 2-core machine they only contend."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- helpers


def down_proj_names(editor: SequentialEditor) -> list[str]:
    """The edited modules, spelled out with LLaMA's module names (not sphere_pl's templates)."""
    return [f"model.layers.{layer}.mlp.down_proj" for layer in editor.method.layers]


def edited_weights(editor: SequentialEditor) -> dict[str, torch.Tensor]:
    return {name: editor.model.get_submodule(name).weight.detach().clone() for name in down_proj_names(editor)}


def pretrained_weights(model_dir: str, names: list[str]) -> dict[str, torch.Tensor]:
    """The weights as saved on disk, read with plain transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {name: model.get_submodule(name).weight.detach().clone() for name in names}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def brute_force_he(weight: torch.Tensor) -> float:
    """Mean over ordered pairs i != j of 1 / ||ŵ_i − ŵ_j|| (s = 1), in float64, pair by pair."""
    rows = weight.detach().double()
    rows = rows / rows.norm(dim=1, keepdim=True)
    n = rows.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                total += 1.0 / float((rows[i] - rows[j]).norm())
    return total / (n * (n - 1))


def quickstart_data(tmp_path: Path, **overrides) -> EditDataModule:
    kwargs = dict(
        source="quickstart",
        dataset_size_limit=NUM_FACTS,
        num_edits=NUM_EDITS,
        num_holdout=4,
        cache_dir=str(tmp_path / "data-cache"),
    )
    kwargs.update(overrides)
    return EditDataModule(**kwargs)


LANDMARKS = ["Aldo Tower", "Birch Gate", "Cobalt Bridge", "Dune Hall", "Elm Arena", "Fjord Mill",
             "Granite Dome", "Harbor Spire", "Iris Palace", "Juniper Arch", "Kestrel Keep", "Lumen Hall"]
CITIES = ["Rome", "Paris", "Oslo", "Lima", "Cairo", "Tokyo"]


def flat_records(n: int = NUM_FACTS) -> list[dict]:
    """Valid records in the flat MEND/EasyEdit CounterFact schema, case_ids "fact-00", "fact-01", ..."""
    return [
        {
            "case_id": f"fact-{i:02d}",
            "prompt": f"{LANDMARKS[i]} is located in the city of",
            "subject": LANDMARKS[i],
            "target_new": CITIES[i % len(CITIES)],
            "ground_truth": CITIES[(i + 1) % len(CITIES)],
            "rephrase_prompt": f"Tourists visit {LANDMARKS[i]} in the city of",
            "locality_prompt": f"The old market number {i} is located in the city of",
            "locality_ground_truth": CITIES[(i + 1) % len(CITIES)],
        }
        for i in range(n)
    ]


def write_json(path: Path, records) -> str:
    path.write_text(json.dumps(records))
    return str(path)


def make_trainer(
    root: Path, *callbacks: L.Callback, logger=False, he_every: int = 1, keep_last: int | None = None, facts: FactMonitor | None = None
) -> L.Trainer:
    """A trainer configured like the CLI's defaults: the fact monitor, the HE monitor and edit checkpoints in root/checkpoints."""
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        default_root_dir=root,
        logger=logger,
        callbacks=[
            facts if facts is not None else FactMonitor(),
            HypersphericalEnergyMonitor(every_n_batches=he_every),
            EditCheckpoint(dirpath=str(root / "checkpoints"), keep_last=keep_last),
            *callbacks,
        ],
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def csv_logger(root: Path) -> CSVLogger:
    return CSVLogger(root, name="csv", version=0)


def logged_rows(trainer: L.Trainer) -> list[dict[str, float]]:
    """The rows of a CSVLogger run, empty cells dropped."""
    with open(Path(trainer.logger.log_dir) / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def load_ckpt(path: Path) -> dict:
    return load_checkpoint_file(path)


class Recorder(L.Callback):
    """Which batches reach the editor, and the edited weights after each applied batch (keyed by batches_done)."""

    def __init__(self):
        self.batch_indices: list[int] = []
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_indices.append(batch.index)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights[pl_module.editor.batches_done] = edited_weights(pl_module)


def run_uninterrupted(tiny_model_dir, tiny_method, tmp_path, name="reference", **data_overrides):
    editor = SequentialEditor(PretrainedModel(tiny_model_dir), method=tiny_method())
    recorder = Recorder()
    trainer = make_trainer(tmp_path / name, recorder, logger=csv_logger(tmp_path / name))
    trainer.fit(editor, quickstart_data(tmp_path, **data_overrides))
    return editor, trainer, recorder


def run_interrupted_then_resumed(tiny_model_dir, tiny_method, tmp_path, crash_before: int):
    """Crash before batch `crash_before`; resume a fresh editor from the checkpoint written after the batch before."""
    interrupted = SequentialEditor(PretrainedModel(tiny_model_dir), method=tiny_method())
    crashing = make_trainer(tmp_path / "interrupted", CrashBeforeBatch(crash_before))
    with pytest.raises(SimulatedCrash):
        crashing.fit(interrupted, quickstart_data(tmp_path))
    ckpt = tmp_path / "interrupted" / "checkpoints" / f"edits-{crash_before * NUM_EDITS:06d}.ckpt"
    assert ckpt.is_file()

    resumed = SequentialEditor(PretrainedModel(tiny_model_dir), method=tiny_method())
    recorder = Recorder()
    trainer = make_trainer(tmp_path / "resumed", recorder, logger=csv_logger(tmp_path / "resumed"))
    trainer.fit(resumed, quickstart_data(tmp_path), ckpt_path=str(ckpt))
    return interrupted, resumed, trainer, recorder


# ------------------------------------------------------------------- 1. resume equivalence


@pytest.mark.parametrize("crash_before", [1, 2])
def test_resumed_run_equals_uninterrupted_run(tiny_model_dir, tiny_method, tmp_path, crash_before):
    reference, reference_trainer, _ = run_uninterrupted(tiny_model_dir, tiny_method, tmp_path)
    interrupted, resumed, resumed_trainer, recorder = run_interrupted_then_resumed(
        tiny_model_dir, tiny_method, tmp_path, crash_before
    )

    # the first run really stopped after `crash_before` batches, leaving no later checkpoint
    assert interrupted.editor.edits_applied == crash_before * NUM_EDITS
    written = sorted(p.name for p in (tmp_path / "interrupted" / "checkpoints").glob("edits-*.ckpt"))
    assert written == [f"edits-{(i + 1) * NUM_EDITS:06d}.ckpt" for i in range(crash_before)]

    # the resumed run starts at the first unapplied batch and applies each remaining batch once
    assert recorder.batch_indices == list(range(crash_before, NUM_BATCHES))
    assert resumed.editor.batches_done == NUM_BATCHES
    assert resumed.editor.edits_applied == NUM_FACTS
    # the facts evaluated as "edited": derived from the batches the editor applied
    edited = resumed_trainer.datamodule.edited_requests(resumed.editor.batches_done)
    assert edited == reference_trainer.datamodule.edited_requests(reference.editor.batches_done) and len(edited) == NUM_FACTS

    final = edited_weights(reference)
    assert max_abs_diff(edited_weights(resumed), final) <= 1e-6
    resumed_moments, reference_moments = resumed.method.previous_key_moments, reference.method.previous_key_moments
    assert float((resumed_moments - reference_moments).abs().max()) <= 1e-6
    # ...and that is not trivially true: the remaining batches changed the weights and the method state
    assert max_abs_diff(edited_weights(interrupted), final) > 1e-5
    assert float((interrupted.method.previous_key_moments - reference_moments).abs().max()) > 1e-3

    # what both runs logged after the last batch (HE against the pretrained weights, metrics on all edited facts)
    def last_train_row(trainer):  # everything logged after the last batch (HE and metrics come in separate rows)
        rows = logged_rows(trainer)
        last_step = max(r["step"] for r in rows if "he/layer1" in r)
        merged = {}
        for r in rows:
            if r["step"] == last_step and not any(k.startswith("final/") for k in r):
                merged.update(r)
        return merged

    reference_row, resumed_row = last_train_row(reference_trainer), last_train_row(resumed_trainer)
    compared = [k for k in reference_row if k.startswith(("he", "edited_so_far/", "never_edited/"))]
    assert len(compared) > 10 and resumed_row["edits"] == reference_row["edits"] == NUM_FACTS
    resumed_values = {k: resumed_row[k] for k in compared}
    assert resumed_values == pytest.approx({k: reference_row[k] for k in compared}, rel=1e-5, abs=1e-9)


def test_keep_last_holds_across_resume(tiny_model_dir, tiny_method, tmp_path):
    """A resumed run writing to the same directory keeps only the newest `keep_last` numbered checkpoints."""
    directory = tmp_path / "run" / "checkpoints"
    editor = SequentialEditor(PretrainedModel(tiny_model_dir), method=tiny_method())
    with pytest.raises(SimulatedCrash):
        make_trainer(tmp_path / "run", CrashBeforeBatch(2), keep_last=2).fit(editor, quickstart_data(tmp_path))
    assert sorted(p.name for p in directory.glob("edits-*.ckpt")) == ["edits-000004.ckpt", "edits-000008.ckpt"]

    resumed = SequentialEditor(PretrainedModel(tiny_model_dir), method=tiny_method())
    trainer = make_trainer(tmp_path / "run", keep_last=2)
    trainer.fit(resumed, quickstart_data(tmp_path), ckpt_path=str(directory / "edits-000008.ckpt"))
    assert resumed.editor.edits_applied == NUM_FACTS
    assert sorted(p.name for p in directory.glob("edits-*.ckpt")) == ["edits-000008.ckpt", "edits-000012.ckpt"]


# ----------------------------------------------------------------- 2. checkpoint contents


def test_checkpoint_holds_only_edited_weights_and_method_state(tiny_model_dir, tiny_method, tmp_path):
    editor = SequentialEditor(PretrainedModel(tiny_model_dir), method=tiny_method(), history_size=2)
    make_trainer(tmp_path).fit(editor, quickstart_data(tmp_path))
    directory = tmp_path / "checkpoints"
    names = down_proj_names(editor)
    method_state = editor.method.state_dict()
    d_in = editor.method.projectors.shape[-1]
    # compact: P and C_p (d_in x d_in per layer) are recomputed, not saved; C_p travels as the keys
    assert not {"projectors", "previous_key_moments"} & set(method_state)

    for batches in range(1, NUM_BATCHES + 1):
        ckpt = load_ckpt(directory / f"edits-{batches * NUM_EDITS:06d}.ckpt")
        assert ckpt["state_dict"] == {}  # no copy of the whole model
        assert "hyper_parameters" not in ckpt  # the config, not the checkpoint, decides the model
        state = ckpt["sphere_pl"]
        assert state["batches_done"] == batches and state["edits_applied"] == batches * NUM_EDITS
        assert sorted(state["weights"]) == sorted(names)
        assert len(state["recent_patches"]) == min(batches, 2)
        assert set(state["method"]) == set(method_state)
        keys = state["method"]["_extra_state"]["batch_keys"]
        assert len(keys) == batches and all(k.shape == (d_in, NUM_EDITS) for layer_keys in keys for k in layer_keys)

    last = load_ckpt(directory / "last.ckpt")["sphere_pl"]
    for name in names:
        assert torch.equal(last["weights"][name], editor.model.get_submodule(name).weight)
    for key, value in method_state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(last["method"][key], value), key

    def saved_size(obj) -> int:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return buffer.getbuffer().nbytes

    full_size = saved_size(editor.model.state_dict())
    edited_size = saved_size({n: editor.model.get_submodule(n).weight for n in names})
    method_size = saved_size(method_state)
    ckpt_size = (directory / "last.ckpt").stat().st_size
    # edited weights + 2 batch patches (each at most the edited weights' size) + method state + small bookkeeping
    assert ckpt_size < 3 * edited_size + method_size + 200_000
    assert edited_size < full_size / 4


# --------------------------------------------------------------- 3. bad input: no edit at all


def _subject_not_in_prompt(records):
    records[2]["subject"] = "Zanzibar Lighthouse"
    return records[2]["case_id"], "subject"


def _empty_target(records):
    records[2]["target_new"] = ""
    return records[2]["case_id"], "target_new"


def _missing_field(records):
    del records[2]["locality_prompt"]
    return records[2]["case_id"], "locality_prompt"


@pytest.mark.parametrize("corrupt", [_subject_not_in_prompt, _empty_target, _missing_field])
def test_bad_record_stops_the_run_before_any_edit(tiny_model_dir, tiny_method, tmp_path, corrupt):
    records = flat_records(6)
    case_id, field = corrupt(records)
    # two facts per batch, file order: the bad third record is in the second batch, so a lazy
    # check would apply (and checkpoint) the first batch before noticing
    data = EditDataModule(
        source=write_json(tmp_path / "edits.json", records), num_edits=2, num_holdout=0, shuffle=False,
        cache_dir=str(tmp_path / "data-cache"),
    )
    editor = SequentialEditor(PretrainedModel(tiny_model_dir), method=tiny_method())
    with pytest.raises(EditDataError) as failure:
        make_trainer(tmp_path / "run").fit(editor, data)
    message = str(failure.value)
    assert case_id in message and repr(field) in message
    assert editor.editor.edits_applied == 0
    names = down_proj_names(editor)
    assert max_abs_diff(edited_weights(editor), pretrained_weights(tiny_model_dir, names)) == 0
    assert list(tmp_path.rglob("*.ckpt*")) == []


def _missing_file(directory: Path) -> str:
    return str(directory / "does-not-exist.json")


def _truncated_json(directory: Path) -> str:
    """A JSON file cut off in the middle of a record."""
    text = json.dumps(flat_records(3))
    path = directory / "truncated.json"
    path.write_text(text[: len(text) // 2])
    return str(path)


@pytest.mark.parametrize(
    "make_source, error",
    [(_missing_file, FileNotFoundError), (_truncated_json, EditSourceError)],
    ids=["missing", "truncated"],
)
def test_unreadable_source_stops_the_run_before_any_edit(tiny_model_dir, tiny_method, tmp_path, make_source, error):
    source = make_source(tmp_path)
    data = EditDataModule(source=source, num_edits=2, num_holdout=0, cache_dir=str(tmp_path / "data-cache"))
    editor = SequentialEditor(PretrainedModel(tiny_model_dir), method=tiny_method())
    with pytest.raises(error) as failure:
        make_trainer(tmp_path / "run").fit(editor, data)
    assert source in str(failure.value)
    assert editor.editor.edits_applied == 0
    names = down_proj_names(editor)
    assert max_abs_diff(edited_weights(editor), pretrained_weights(tiny_model_dir, names)) == 0
    assert list(tmp_path.rglob("*.ckpt*")) == []


# --------------------------------------------------------- 4. non-finite update: rollback


class _PoisonedWriter:
    """Passes writes through, except that the second one gets a NaN in its delta; records the
    weight of every module right after it was written."""

    def __init__(self, writer):
        self.writer = writer
        self.writes = 0
        self.written: dict[str, torch.Tensor] = {}

    def write(self, module_name, delta):
        self.writes += 1
        if self.writes == 2:
            delta = delta.clone()
            delta[0, 0] = float("nan")
        result = self.writer.write(module_name, delta)
        self.written[module_name] = self.writer.lm.model.get_submodule(module_name).weight.detach().clone()
        return result

    def __getattr__(self, name):  # everything else (provisional writes, ...) is the real writer's
        return getattr(self.writer, name)


def poison_second_layer(method, bad_call: int) -> dict:
    """Make the `bad_call`-th (0-based) call of `method.edit` produce a NaN delta for its second layer.
    Returns a dict that will hold that call's poisoned writer."""
    state = {}
    original_edit = method.edit
    calls = itertools.count()

    def edit(lm, requests, writer):
        if next(calls) == bad_call:
            writer = state["writer"] = _PoisonedWriter(writer)
        return original_edit(lm, requests, writer)

    method.edit = edit  # an instance attribute: state_dict keys stay those of a plain AlphaEdit
    return state


def test_non_finite_update_rolls_back_the_batch(tiny_model_dir, tiny_method, tmp_path):
    source = write_json(tmp_path / "edits.json", flat_records())

    def data():
        return EditDataModule(
            source=source, num_edits=NUM_EDITS, num_holdout=0, shuffle=False, cache_dir=str(tmp_path / "data-cache")
        )

    method = tiny_method()
    poisoned = poison_second_layer(method, bad_call=1)
    editor = SequentialEditor(PretrainedModel(tiny_model_dir), method=method)
    recorder = Recorder()
    failing_data = data()
    with pytest.raises(EditFailedError) as failure:
        make_trainer(tmp_path / "run", recorder).fit(editor, failing_data)

    batches = failing_data.edit_batches
    message = str(failure.value)
    assert re.search(r"\bbatch 1\b", message)
    assert all(str(r.case_id) in message for r in batches[1].requests)
    assert not any(str(r.case_id) in message for r in batches[0].requests + batches[2].requests)
    assert isinstance(failure.value.__cause__, NonFiniteUpdateError)

    # the first layer of batch 1 had been written when the second one failed; it was rolled back
    first, second = down_proj_names(editor)
    writer = poisoned["writer"]
    assert list(writer.written) == [first]
    after_batch_0 = recorder.weights[1]
    assert not torch.equal(writer.written[first], after_batch_0[first])
    assert max_abs_diff(edited_weights(editor), after_batch_0) == 0
    assert (editor.editor.batches_done, editor.editor.edits_applied) == (1, NUM_EDITS)

    # the last checkpoint is that of batch 0, and it matches the rolled-back model
    directory = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in directory.glob("*.ckpt")) == [f"edits-{NUM_EDITS:06d}.ckpt", "last.ckpt"]
    last = load_ckpt(directory / "last.ckpt")
    assert last["sphere_pl"]["edits_applied"] == NUM_EDITS
    for name in (first, second):
        assert torch.equal(last["sphere_pl"]["weights"][name], after_batch_0[name])
    assert len(last["sphere_pl"]["method"]["_extra_state"]["batch_keys"]) == 1  # C_p is rebuilt from batch 0's keys

    # resuming from it with a healthy method completes the run, as if nothing had failed
    resumed = SequentialEditor(PretrainedModel(tiny_model_dir), method=tiny_method())
    resumed_recorder = Recorder()
    make_trainer(tmp_path / "run", resumed_recorder).fit(resumed, data(), ckpt_path=str(directory / "last.ckpt"))
    assert resumed_recorder.batch_indices == [1, 2]
    assert resumed.editor.edits_applied == NUM_FACTS

    healthy = SequentialEditor(PretrainedModel(tiny_model_dir), method=tiny_method())
    make_trainer(tmp_path / "healthy").fit(healthy, data())
    assert max_abs_diff(edited_weights(resumed), edited_weights(healthy)) <= 1e-6
    assert max_abs_diff(edited_weights(resumed), after_batch_0) > 1e-5


# --------------------------------------------------------------------- 5. HE monitor


def _assert_he_rows(rows, recorder, pretrained, layers):
    """Every training row's he/he_delta/he_relative match a brute-force computation on the recorded weights."""
    he_rows = [r for r in rows if "he/layer1" in r]
    assert [r["edits"] for r in he_rows] == [NUM_EDITS * b for b in sorted(recorder.weights)]
    for row, batches in zip(he_rows, sorted(recorder.weights)):
        for layer in layers:
            name = f"model.layers.{layer}.mlp.down_proj"
            he = brute_force_he(recorder.weights[batches][name])
            he0 = brute_force_he(pretrained[name])
            assert row[f"he/layer{layer}"] == pytest.approx(he, rel=1e-6)
            assert row[f"he_delta/layer{layer}"] == pytest.approx(he - he0, rel=1e-4, abs=1e-10)
            assert row[f"he_relative/layer{layer}"] == pytest.approx((he - he0) / he0, rel=1e-4, abs=1e-10)
    return he_rows


def test_he_monitor_logs_energy_of_the_edited_weights(tiny_model_dir, tiny_method, tmp_path):
    editor, trainer, recorder = run_uninterrupted(tiny_model_dir, tiny_method, tmp_path)
    names = down_proj_names(editor)
    pretrained = pretrained_weights(tiny_model_dir, names)
    layers = editor.method.layers
    assert layers == [1, 2]

    he_rows = _assert_he_rows(logged_rows(trainer), recorder, pretrained, layers)
    assert len(he_rows) == NUM_BATCHES
    # the last row is the final model
    assert max_abs_diff(recorder.weights[NUM_BATCHES], edited_weights(editor)) == 0
    last_he_row = he_rows[-1]
    for layer in layers:
        assert last_he_row[f"he/layer{layer}"] == pytest.approx(
            brute_force_he(editor.model.get_submodule(f"model.layers.{layer}.mlp.down_proj").weight), rel=1e-6
        )


class LowRestraintBound(L.Callback):
    """PRUNE's bound on the cumulative change lowered (after its set-up) so that its restraint acts;
    after every batch, the evaluated (restrained) and the live weights."""

    def __init__(self):
        self.evaluated, self.live = {}, {}

    def on_fit_start(self, trainer, pl_module):
        pl_module.method.sigma_max = [1e-4] * len(pl_module.method.layers)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        done = pl_module.editor.batches_done
        self.live[done] = {k: w.detach().clone() for k, w in pl_module.editor.edited_weights().items()}
        with pl_module.editor.evaluation_weights():
            self.evaluated[done] = {k: w.detach().clone() for k, w in pl_module.editor.edited_weights().items()}


def test_he_is_that_of_the_evaluated_weights_and_the_live_ones_are_logged_beside_it(tiny_model_dir, stats_cache, tmp_path):
    """PRUNE evaluates restrained weights while the model keeps the raw deltas: HE (and so the HE
    analysis) describes the weights the metrics were measured on, `he_live/` the others."""
    from conftest import tiny_method_kwargs
    from sphere_pl import PRUNE

    editor = SequentialEditor(PretrainedModel(tiny_model_dir), method=PRUNE(**tiny_method_kwargs(stats_cache)["prune"]))
    weights = LowRestraintBound()
    trainer = make_trainer(tmp_path, weights, logger=csv_logger(tmp_path))
    trainer.fit(editor, quickstart_data(tmp_path))
    rows = [r for r in logged_rows(trainer) if "he/layer1" in r]
    assert [r["edits"] for r in rows] == [4, 8, 12]
    for row, done in zip(rows, (1, 2, 3)):
        for layer in (1, 2):
            evaluated, live = weights.evaluated[done][f"layer{layer}"], weights.live[done][f"layer{layer}"]
            assert float((evaluated - live).abs().max()) > 0  # the restraint acted
            assert row[f"he/layer{layer}"] == pytest.approx(brute_force_he(evaluated), rel=1e-6)
            assert row[f"he_live/layer{layer}"] == pytest.approx(brute_force_he(live), rel=1e-6)
            assert row[f"he/layer{layer}"] != pytest.approx(row[f"he_live/layer{layer}"], rel=1e-9)


def test_he_baseline_survives_resume(tiny_model_dir, tiny_method, tmp_path):
    interrupted, resumed, trainer, recorder = run_interrupted_then_resumed(tiny_model_dir, tiny_method, tmp_path, 1)
    names = down_proj_names(resumed)
    pretrained = pretrained_weights(tiny_model_dir, names)
    # a baseline taken from the restored (once edited) weights would differ measurably from the pretrained one
    for name in names:
        restored = interrupted.model.get_submodule(name).weight
        assert abs(brute_force_he(restored) - brute_force_he(pretrained[name])) > 1e-8

    he_rows = _assert_he_rows(logged_rows(trainer), recorder, pretrained, resumed.method.layers)
    assert [r["edits"] for r in he_rows] == [2 * NUM_EDITS, 3 * NUM_EDITS]


# ------------------------------------------------------------------------ 6. metrics


class EvaluationProbe(L.Callback):
    """After each batch: the module's evaluation sample (asked twice), and an independent evaluation of it."""

    def __init__(self, data: EditDataModule, facts: FactMonitor):
        self.data, self.facts = data, facts
        self.samples: dict[int, list] = {}
        self.expected: dict[int, dict[str, float]] = {}
        self.expected_all_edited: dict[int, dict[str, float]] = {}
        self.expected_last_batch: dict[int, dict[str, float]] = {}
        self.expected_pre_edit: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        done = pl_module.editor.batches_done
        sample = self.facts.sample(self.data.edited_requests(done))
        assert self.facts.sample(self.data.edited_requests(done)) == sample  # the same on every call
        self.samples[done] = sample
        edited_so_far = self.data.edit_requests[: done * NUM_EDITS]  # from the data, not from the module

        def evaluate(prefix, requests):
            values = CounterFactEvaluator(prefix).evaluate(pl_module.model, pl_module.editor.tokenizer, requests)
            return {k: float(v) for k, v in values.items()}

        self.expected[done] = {**evaluate("edited_so_far/", sample), **evaluate("never_edited/", self.data.holdout_requests)}
        self.expected_all_edited[done] = evaluate("edited_so_far/", edited_so_far)
        self.expected_last_batch[done] = evaluate("last_batch/", batch.requests)

    def on_fit_start(self, trainer, pl_module):
        # before any edit: the sample that the facts edited so far will end up with
        everything = self.facts.sample(self.data.edit_requests)
        values = CounterFactEvaluator("pre_edit/to_edit/").evaluate(pl_module.model, pl_module.editor.tokenizer, everything)
        self.expected_pre_edit = {k: float(v) for k, v in values.items()}
        holdout = CounterFactEvaluator("never_edited/").evaluate(pl_module.model, pl_module.editor.tokenizer, self.data.holdout_requests)
        self.expected_pre_edit_never_edited = {k: float(v) for k, v in holdout.items()}


def test_metrics_logged_every_eval_every_batches_on_a_fixed_sample(tiny_model_dir, tiny_method, tmp_path):
    sample_size = 3
    editor = SequentialEditor(PretrainedModel(tiny_model_dir), method=tiny_method())
    facts = FactMonitor(every_n_batches=2, sample_size=sample_size)
    data = quickstart_data(tmp_path, eval_requests_per_batch=5)  # validation in uneven chunks of 5, 5, 2
    probe = EvaluationProbe(data, facts)
    trainer = make_trainer(tmp_path, probe, logger=csv_logger(tmp_path), he_every=2, facts=facts)
    trainer.fit(editor, data)
    rows = logged_rows(trainer)

    # one row per edit batch, then the end-of-fit validation row
    assert [r["edits"] for r in rows if "edit/value_loss" in r] == [4, 8, 12]
    # evaluation (and HE, every 2 batches too) only after the second batch: later rows must not
    # repeat those values as if they had been measured at 12 edits
    assert [r["edits"] for r in rows if "edited_so_far/efficacy_score" in r] == [8]
    assert [r["edits"] for r in rows if "never_edited/specificity_score" in r] == [0, 8]  # their starting point, then the point
    assert [r["edits"] for r in rows if "he/layer1" in r] == [8]
    row = next(r for r in rows if "edited_so_far/efficacy_score" in r)
    expected = probe.expected[2]
    assert {k: row[k] for k in expected} == pytest.approx(expected, rel=1e-6, abs=1e-12)
    # the sample, not all 8 edited facts, was evaluated (the two differ)
    all_edited = probe.expected_all_edited[2]["edited_so_far/efficacy_magnitude"]
    assert all_edited != pytest.approx(expected["edited_so_far/efficacy_magnitude"])
    # the batch just edited: after every batch, exactly its own facts
    last = [r for r in rows if "last_batch/efficacy_score" in r]
    assert [r["edits"] for r in last] == [4, 8, 12]
    for r, done in zip(last, (1, 2, 3)):
        assert {k: r[k] for k in probe.expected_last_batch[done]} == pytest.approx(probe.expected_last_batch[done], rel=1e-6, abs=1e-12)
    # before editing: the facts to be edited, on the unedited model, logged at 0 edits
    pre = [r for r in rows if "pre_edit/to_edit/efficacy_score" in r]
    assert [r["edits"] for r in pre] == [0]
    assert {k: pre[0][k] for k in probe.expected_pre_edit} == pytest.approx(probe.expected_pre_edit, rel=1e-6, abs=1e-12)
    expected = probe.expected_pre_edit_never_edited
    assert {k: pre[0][k] for k in expected} == pytest.approx(expected, rel=1e-6, abs=1e-12)  # never-edited facts before editing

    # the sample: k facts, all already edited, and a fact edited earlier enters it only when first edited
    for done, sample in probe.samples.items():
        edited_so_far = data.edit_requests[: done * NUM_EDITS]
        assert len(sample) == sample_size
        assert len({r.case_id for r in sample}) == sample_size
        assert all(r in edited_so_far for r in sample)
        if done > 1:
            earlier = data.edit_requests[: (done - 1) * NUM_EDITS]
            previous = {r.case_id for r in probe.samples[done - 1]}
            assert {r.case_id for r in sample if r in earlier} <= previous

    # end of fit: every edited fact (not the sample) is evaluated over all validation chunks
    final_rows = [r for r in rows if "final/edited/efficacy_score" in r]
    assert len(final_rows) == 1 and final_rows[0]["edits"] == NUM_FACTS
    final = {
        f"final/edited/{k}": float(v)
        for k, v in CounterFactEvaluator().evaluate(editor.model, editor.editor.tokenizer, data.edit_requests).items()
    }
    assert {k: final_rows[0][k] for k in final} == pytest.approx(final, rel=1e-5, abs=1e-9)


def test_edited_sample_depends_only_on_the_edited_facts(tiny_model_dir, tiny_method, tmp_path):
    data = quickstart_data(tmp_path)
    data.setup("fit")
    facts = FactMonitor(sample_size=5)
    assert facts.sample(data.edit_requests[:4]) == data.edit_requests[:4]
    sample = facts.sample(list(data.edit_requests))
    assert len(sample) == 5 and all(r in data.edit_requests for r in sample)
    other = FactMonitor(sample_size=5)  # same facts, other order: same sample
    assert sorted(r.case_id for r in other.sample(list(reversed(data.edit_requests)))) == sorted(r.case_id for r in sample)


# -------------------------------------------------------------------- 7. CLI + W&B


def test_a_wrapped_model_is_edited_as_the_loaded_one_is(tiny_model_dir, tiny_method, tmp_path):
    """`PretrainedModel.wrap` hands the editor an already-built model (that object, not a copy), which is
    edited bit for bit as the one `PretrainedModel` loads from the same path."""
    reference, _, _ = run_uninterrupted(tiny_model_dir, tiny_method, tmp_path)
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    editor = SequentialEditor(PretrainedModel.wrap(model, tokenizer, tiny_model_dir), method=tiny_method())
    assert editor.model is model and editor.editor.tokenizer is tokenizer
    assert editor.load_settings == PretrainedModel(tiny_model_dir).settings()  # checkpoints name it as a loaded one
    make_trainer(tmp_path / "prebuilt").fit(editor, quickstart_data(tmp_path))
    assert editor.editor.edits_applied == NUM_FACTS
    assert max_abs_diff(edited_weights(editor), edited_weights(reference)) == 0
    assert max_abs_diff(edited_weights(editor), pretrained_weights(tiny_model_dir, down_proj_names(editor))) > 1e-5


def test_print_config_shows_the_callback_sections(tmp_path):
    result = run_cli(["fit", "--print_config"], tmp_path, cli_env(tmp_path))
    config = yaml.safe_load(result.stdout)
    assert re.search(r"^he:$", result.stdout, re.M) and re.search(r"^checkpoint:$", result.stdout, re.M)
    assert set(config["he"]) >= {"s", "reduction", "every_n_batches"}
    assert set(config["checkpoint"]) >= {"dirpath", "every_n_batches", "keep_last"}
    assert config["model"]["model"] is None  # the embedded SmolLM2 in float32
    given = yaml.safe_load(run_cli(["fit", "--print_config", "--model.model.dtype", "bfloat16"], tmp_path, cli_env(tmp_path)).stdout)
    loading = given["model"]["model"]  # built by the CLI before the editor, from its own section
    assert loading["class_path"] == "sphere_pl.PretrainedModel"
    assert loading["init_args"]["dtype"] == "bfloat16" and loading["init_args"]["name_or_path"] is None


def test_cli_fit_logs_to_offline_wandb_and_validate_restores_the_edits(tiny_model_dir, stats_cache, tmp_path):
    config = {
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False},
        "model": {
            "model": {"name_or_path": tiny_model_dir},
            "method": {
                "class_path": "sphere_pl.AlphaEdit",
                "init_args": {
                    "layers": [1, 2],
                    "values": {"num_grad_steps": 5, "lr": 0.5},
                    "stats": {"corpus": str(CORPUS), "num_samples": 20, "seq_len": 64, "cache_dir": stats_cache},
                    "context_templates": CONTEXT_TEMPLATES,
                },
            },
        },
        "data": {
            "source": "quickstart",
            "dataset_size_limit": NUM_FACTS,
            "num_edits": NUM_EDITS,
            "num_holdout": 4,
            "cache_dir": str(tmp_path / "data-cache"),
        },
    }
    config_path = tmp_path / "edit.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = cli_env(tmp_path)

    # fit with the default logger (AutoWandbLogger, save_dir "runs" under the working directory)
    run_cli(["fit", "--config", str(config_path)], tmp_path, env)
    runs = find_offline_runs(tmp_path / "runs")
    assert len(runs) == 1
    history = read_offline_history(runs[0])
    assert [r["edits"] for r in history if "he/layer1" in r] == [4, 8, 12]
    assert [r["edits"] for r in history if "edited_so_far/efficacy_score" in r] == [4, 8, 12]
    final_rows = [r for r in history if "final/edited/efficacy_magnitude" in r]
    assert len(final_rows) == 1 and final_rows[0]["edits"] == NUM_FACTS

    # validate the last checkpoint with the same config, logging to CSV
    last = tmp_path / "runs" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    csv_config = tmp_path / "csv.yaml"
    csv_logger_config = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(tmp_path / "validate"), "name": "csv", "version": 0},
    }
    csv_config.write_text(yaml.safe_dump({"trainer": {"logger": csv_logger_config}}))
    configs = ["--config", str(config_path), "--config", str(csv_config)]
    run_cli(["validate", *configs, "--ckpt_path", str(last)], tmp_path, env)
    with open(tmp_path / "validate" / "csv" / "version_0" / "metrics.csv", newline="") as f:
        rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    validated = [r for r in rows if "final/edited/efficacy_score" in r]
    assert len(validated) == 1 and validated[0]["edits"] == NUM_FACTS
    # the restored edits give the fit's end-of-run metrics...
    keys = ("final/edited/efficacy_magnitude", "final/edited/generalization_magnitude", "final/edited/specificity_magnitude")
    for key in keys:
        assert validated[0][key] == pytest.approx(final_rows[0][key], rel=1e-6)

    data = quickstart_data(tmp_path)
    data.setup("fit")
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    before = CounterFactEvaluator("final/edited/").evaluate(model, tokenizer, data.edit_requests)
    # ...which the unedited model does not (the tiny model's edits are small, but far above that tolerance)
    for key in keys:
        assert abs(float(before[key]) - final_rows[0][key]) > 100 * 1e-6 * abs(final_rows[0][key]), key


def test_the_unedited_baseline_scores_each_points_sample_on_the_pretrained_weights_and_leaves_the_run_alone(tiny_model_dir, tiny_method, tmp_path):
    """`facts.unedited_baseline`: at each point, the edited-so-far sample scored on the pretrained weights too
    (`pre_edit/edited_so_far/`), equal to an independent evaluation of that sample on the model as saved; the run
    itself (weights, every other metric) is the same as without it."""
    sample_size = 3
    runs = {}
    for baseline in (False, True):
        editor = SequentialEditor(PretrainedModel(tiny_model_dir), method=tiny_method())
        facts = FactMonitor(every_n_batches=1, sample_size=sample_size, unedited_baseline=baseline)
        data = quickstart_data(tmp_path)
        trainer = make_trainer(tmp_path / f"baseline-{baseline}", logger=csv_logger(tmp_path / f"baseline-{baseline}"), facts=facts)
        trainer.fit(editor, data)
        runs[baseline] = (editor, facts, data, logged_rows(trainer))
    (plain, _, _, plain_rows), (editor, facts, data, rows) = runs[False], runs[True]
    assert max_abs_diff(edited_weights(editor), edited_weights(plain)) == 0
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    points = [r for r in rows if "pre_edit/edited_so_far/efficacy_score" in r]
    assert [r["edits"] for r in points] == [4, 8, 12]
    for row in points:
        sample = facts.sample(data.edit_requests[: int(row["edits"])])
        expected = CounterFactEvaluator("pre_edit/edited_so_far/").evaluate(model, tokenizer, sample)
        assert {k: row[k] for k in expected} == pytest.approx({k: float(v) for k, v in expected.items()}, rel=1e-6, abs=1e-12)
    def measured(table):  # every edited_so_far, never_edited and HE value, in the order logged
        return [(k, v) for r in table for k, v in r.items() if k.startswith(("edited_so_far/", "never_edited/", "he/"))]

    assert len(measured(plain_rows)) > 30 and measured(rows) == measured(plain_rows)
