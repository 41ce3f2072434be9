"""The contract every registered editing method must keep, checked on each one through the `Editor`.

- writes happen only through the writer;
- a non-finite update rolls the batch back (weights and method state);
- resuming from `state_dict()` equals an uninterrupted run;
- reverting patches restores weights and method state exactly;
- the SPHERE-filtered variant differs from the plain one only by the projection.

Expected values come from independent computations: weights reloaded from disk, the
writer's arithmetic repeated by hand, and the projection recomputed in float64 from an
explicit eigendecomposition.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_method_kwargs
from sphere_pl import Editor, EditFailedError, SphereProjection, load_model_and_tokenizer
from sphere_pl.data.records import EditRequest
from sphere_pl.editing.methods import METHODS
from sphere_pl.editing.writer import DeltaFilter, NonFiniteUpdateError

BATCHES = [
    [EditRequest(0, "{} is located in", "Eiffel Tower", "Rome", "Paris"), EditRequest(1, "The capital of {} is", "Japan", "Kyoto", "Tokyo")],
    [EditRequest(2, "{} plays", "Messi", "basketball", "football"), EditRequest(3, "{} was born in", "Einstein", "Madrid", "Ulm")],
    [EditRequest(4, "The language of {} is", "Brazil", "Dutch", "Portuguese"), EditRequest(5, "{} is made by", "iPhone", "Nokia", "Apple")],
]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=sorted(METHODS))
def name(request):
    return request.param


def test_every_registered_method_has_a_tiny_configuration(stats_cache):
    assert set(tiny_method_kwargs(stats_cache)) == set(METHODS)


def test_methods_are_created_by_registered_name_and_unknown_names_are_refused(stats_cache):
    from sphere_pl import create_method

    for registered, cls in METHODS.items():
        assert type(create_method(registered.upper(), **tiny_method_kwargs(stats_cache)[registered])) is cls
    with pytest.raises(ValueError, match=r"unknown editing method 'memitt'; known methods: \['alphaedit'"):
        create_method("memitt")


def make_editor(tiny_model_dir, method_factory, name, filters=None, **kwargs) -> Editor:
    """An editor of the tiny model with method `name`; `filters` None: the SPHERE projection as the paper sets it for the method."""
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    method = method_factory(name)
    filters = [SphereProjection(0.5, method.sphere_strength)] if filters is None else filters
    return Editor(model, tokenizer, method, filters=filters, model_id=tiny_model_dir, **kwargs)


def all_params(editor: Editor) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in editor.model.named_parameters()}


def method_state(editor: Editor) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in editor.method.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    """Equal method states. The value search's memory budget, measured from the machine's free
    memory at set-up (not from the edits), is compared apart where it matters (resume)."""
    assert a.keys() == b.keys()
    a, b = ({k: _without_budget(v) if k == "_extra_state" else v for k, v in x.items()} for x in (a, b))
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert _plain(a[key]) == _plain(b[key]), key


def _without_budget(extra):
    return {k: v for k, v in extra.items() if k != "value_budget"} if isinstance(extra, dict) else extra


def _plain(value):
    """Nested containers with tensors turned into lists, for equality."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


class Recording(DeltaFilter):
    """Passes deltas through unchanged and records (module, weight before the write, delta)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def forward(self, module_name, weight, delta):
        self.calls.append((module_name, weight.detach().clone(), delta.detach().clone()))
        return delta


def weights_changed_outside_the_writer(editor: Editor, batch) -> list[str]:
    """Apply `batch` and name every parameter whose last change did not come from the writer: one
    that changed although the writer never touched it, or whose version moved after its last write."""
    versions = {n: p._version for n, p in editor.model.named_parameters()}
    editor.apply(batch)
    outside = []
    for n, p in editor.model.named_parameters():
        if p._version == versions[n]:
            continue
        module = n.removesuffix(".weight")
        if editor.writer.versions.get(module) != p._version:
            outside.append(n)
    return outside


def test_no_method_changes_a_weight_outside_the_writer(tiny_model_dir, method_factory, name):
    """Provisional writes (MEMIT), a method's own training steps (FT), weights evaluated in place of
    the live ones (PRUNE): every change of a weight during an edit goes through the writer."""
    editor = make_editor(tiny_model_dir, method_factory, name, filters=[SphereProjection(0.5, 0.5)])
    for batch in BATCHES:
        assert weights_changed_outside_the_writer(editor, batch) == []
        with editor.evaluation_weights():
            editor.evaluate(batch)


def test_the_writer_check_catches_a_method_that_writes_around_it(tiny_model_dir, method_factory):
    """The check above is not vacuous: a method that nudges a weight itself after its writes is named."""
    editor = make_editor(tiny_model_dir, method_factory, "memit")
    name = editor.edited_modules[0]
    real_edit = editor.method.edit

    def edit_then_nudge(lm, requests, writer):
        result = real_edit(lm, requests, writer)
        with torch.no_grad():
            lm.model.get_submodule(name).weight.mul_(1.0001)
        return result

    editor.method.edit = edit_then_nudge
    assert weights_changed_outside_the_writer(editor, BATCHES[0]) == [name + ".weight"]


def test_writes_happen_only_through_the_writer(tiny_model_dir, method_factory, name):
    editor = make_editor(tiny_model_dir, method_factory, name, filters=[SphereProjection(0.5, 0.5)])
    editor.apply(BATCHES[0])
    before = all_params(editor)
    written = []
    original_write = editor.writer.write

    def spy(module_name, delta, **kwargs):
        out = original_write(module_name, delta, **kwargs)
        written.append((module_name, out.detach().clone()))
        return out

    editor.writer.write = spy
    editor.apply(BATCHES[1])
    assert {n for n, _ in written} == set(editor.edited_modules)
    expected = dict(before)
    for module_name, delta in written:  # the writer's own arithmetic, repeated: W + delta in the weight dtype
        key = module_name + ".weight"
        expected[key] = expected[key] + delta.to(expected[key].dtype)
    after = all_params(editor)
    for key in after:
        assert torch.equal(after[key], expected[key]), key


def test_non_finite_update_rolls_back_weights_and_method_state(tiny_model_dir, method_factory, name):
    editor = make_editor(tiny_model_dir, method_factory, name)
    original_write = editor.writer.write
    calls = []

    def counting(module_name, delta, **kwargs):
        calls.append(module_name)
        return original_write(module_name, delta, **kwargs)

    editor.writer.write = counting
    editor.apply(BATCHES[0])
    writes_per_batch, calls[:] = len(calls), []
    bad_write = min(2, writes_per_batch)  # the second write where there is one: the first was already written
    weights, state = all_params(editor), method_state(editor)

    def poisoned(module_name, delta, **kwargs):
        calls.append(module_name)
        if len(calls) == bad_write:
            delta = delta.clone()
            delta[0, 0] = float("nan")
        return original_write(module_name, delta, **kwargs)

    editor.writer.write = poisoned
    with pytest.raises(EditFailedError, match=r"edit batch 1 \(case_ids \[2, 3\]\)") as failure:
        editor.apply(BATCHES[1])
    assert isinstance(failure.value.__cause__, NonFiniteUpdateError)
    assert len(calls) == bad_write
    assert max_abs_diff(all_params(editor), weights) == 0
    assert_same_state(method_state(editor), state)
    assert (editor.batches_done, editor.edits_applied) == (1, 2)


def test_a_batch_whose_written_deltas_are_all_zero_is_an_error(tiny_model_dir, method_factory, name):
    editor = make_editor(tiny_model_dir, method_factory, name)
    weights = all_params(editor)
    original_write = editor.writer.write
    editor.writer.write = lambda module_name, delta, **kwargs: original_write(module_name, delta * 0, **kwargs)
    with pytest.raises(EditFailedError, match="every delta written for this batch is zero"):
        editor.apply(BATCHES[0])
    assert max_abs_diff(all_params(editor), weights) == 0 and editor.batches_done == 0


def test_resume_from_state_dict_equals_an_uninterrupted_run(tiny_model_dir, method_factory, name, tmp_path):
    reference = make_editor(tiny_model_dir, method_factory, name)
    for batch in BATCHES:
        reference.apply(batch)

    first = make_editor(tiny_model_dir, method_factory, name)
    first.apply(BATCHES[0])
    torch.save(first.state_dict(), tmp_path / "state.pt")

    resumed = make_editor(tiny_model_dir, method_factory, name)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))  # no pickled code
    for batch in BATCHES[1:]:
        resumed.apply(batch)
    assert max_abs_diff(all_params(resumed), all_params(reference)) == 0
    assert_same_state(method_state(resumed), method_state(reference))
    assert resumed.case_ids == reference.case_ids
    # a resumed run plans its value-search passes within the memory budget of the run it resumes
    budget = getattr(first.method, "value_budget", None)
    if budget is not None:
        assert resumed.method.value_budget.bytes == budget.bytes


def test_revert_restores_weights_and_method_state_exactly(tiny_model_dir, method_factory, name):
    editor = make_editor(tiny_model_dir, method_factory, name, history_size=3)
    patches = [editor.apply(batch) for batch in BATCHES]
    stopped_early = make_editor(tiny_model_dir, method_factory, name)
    stopped_early.apply(BATCHES[0])

    with pytest.raises(ValueError, match="revert patches in reverse order"):
        editor.revert(patches[1])  # not the latest
    editor.revert(patches[2])
    editor.revert(patches[1])
    assert max_abs_diff(all_params(editor), all_params(stopped_early)) == 0
    assert_same_state(method_state(editor), method_state(stopped_early))
    assert (editor.batches_done, editor.edits_applied, editor.case_ids) == (1, 2, [[0, 1]])

    # editing goes on from there exactly as in a run that never applied the reverted batches
    editor.apply(BATCHES[2])
    stopped_early.apply(BATCHES[2])
    assert max_abs_diff(all_params(editor), all_params(stopped_early)) == 0
    assert_same_state(method_state(editor), method_state(stopped_early))

    # and rollback() undoes with the patches the editor keeps
    pretrained = make_editor(tiny_model_dir, method_factory, name)
    editor.rollback(2)
    assert max_abs_diff(all_params(editor), all_params(pretrained)) == 0
    with pytest.raises(ValueError, match="only 0 were applied"):
        editor.rollback(1)


def _explicit_directions(weight: torch.Tensor, eta: float) -> torch.Tensor:
    """U (d_in x r) in float64 from the explicit C = ÂᵀÂ / d_out (SPEC section 3)."""
    a = weight.double() / weight.double().norm(dim=1, keepdim=True)
    values, vectors = torch.linalg.eigh(a.T @ a / a.shape[0])
    values, vectors = values.flip(0), vectors.flip(1)
    r = int(((values.cumsum(0) / values.sum()) <= eta).sum()) + 1
    return vectors[:, :r]


def test_sphere_variant_differs_from_the_plain_one_only_by_the_projection(tiny_model_dir, method_factory, name):
    eta, alpha = 0.5, 0.7
    plain_rec, proposed_rec, written_rec = Recording(), Recording(), Recording()
    plain = make_editor(tiny_model_dir, method_factory, name, filters=[plain_rec])
    sphere = make_editor(tiny_model_dir, method_factory, name, filters=[proposed_rec, SphereProjection(eta, alpha), written_rec])
    for editor in (plain, sphere):
        editor.apply(BATCHES[0])
        with editor.evaluation_weights():  # where a method filters what it evaluates (PRUNE)
            pass

    # the first proposal sees identical inputs in both runs: the same delta, bit for bit
    assert plain_rec.calls[0][0] == proposed_rec.calls[0][0]
    assert torch.equal(plain_rec.calls[0][2], proposed_rec.calls[0][2])
    # every filtered delta is the proposal projected away from its weight's principal directions
    assert len(proposed_rec.calls) == len(written_rec.calls) >= len(sphere.edited_modules)
    for (module_name, weight, proposed), (_, _, written) in zip(proposed_rec.calls, written_rec.calls):
        u = _explicit_directions(weight, eta)
        expected = proposed.double() - alpha * (proposed.double() @ u) @ u.T
        assert float((written.double() - expected).abs().max()) <= 1e-5 * float(expected.abs().max()), module_name
        assert float((written.double() - proposed.double()).abs().max()) > 1e-3 * float(proposed.abs().max())  # it acted


def test_default_filter_is_sphere_with_the_papers_strength_for_the_method(tiny_model_dir, method_factory, name):
    editor = make_editor(tiny_model_dir, method_factory, name)  # no filters given
    [projection] = editor.filters
    assert isinstance(projection, SphereProjection) and projection.cumulative_ratio == 0.5
    assert projection.strength == (0.5 if name == "alphaedit" else 0.8)
