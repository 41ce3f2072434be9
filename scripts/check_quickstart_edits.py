"""Check that the unedited model knows every fact in the quickstart edit set.

For each record, the true target must have a lower length-normalised NLL than the new
target on the rewrite prompt, on every paraphrase, and on every neighborhood prompt
(whose true answer is the record's target_true). Otherwise an edit's "efficacy" would
be measured on a fact the model never held. Prints one row per record and exits 1 if
any record fails.

    python scripts/check_quickstart_edits.py [--path FILE] [--model NAME] [--margin 0.0]

Margins in the table are NLL(new) - NLL(true) in nats per token (positive = knows the fact);
`para` and `neigh` show the smallest margin over that record's prompts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sphere_pl.models import load_model_and_tokenizer  # noqa: E402
from sphere_pl.data.readers import load_edit_requests  # noqa: E402
from sphere_pl.evaluation.scoring import compare_targets  # noqa: E402

DEFAULT_PATH = REPO / "sphere_pl" / "data" / "quickstart_edits.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--model", default=None, help="hub name or path; default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--margin", type=float, default=0.0, help="required NLL(new) - NLL(true), nats per token")
    parser.add_argument("--verbose", "-v", action="store_true", help="also list every failing prompt")
    args = parser.parse_args(argv)

    requests = load_edit_requests(str(args.path), schema="counterfact")
    model, tok = load_model_and_tokenizer(args.model)

    # one batched pass over every prompt: (record index, kind, prompt, new, true)
    rows = []
    for i, r in enumerate(requests):
        rows.append((i, "rewrite", r.rewrite_prompt, r.target_new, r.target_true))
        rows += [(i, "para", p, r.target_new, r.target_true) for p in r.paraphrase_prompts]
        rows += [(i, "neigh", p, r.target_new, r.neighborhood_true) for p in r.neighborhood_prompts]
    nll_new, nll_true = compare_targets(model, tok, [x[2] for x in rows], [x[3] for x in rows], [x[4] for x in rows])
    margins: dict[tuple[int, str], list[float]] = {}
    failing_prompts = []
    for (i, kind, prompt, new, true), m in zip(rows, (nll_new - nll_true).tolist()):
        margins.setdefault((i, kind), []).append(m)
        if m <= args.margin:
            failing_prompts.append(f"  case {requests[i].case_id} {kind}: {prompt!r} -> {true!r} vs {new!r}: {m:+.2f}")

    def n_tokens(target: str) -> int:
        return len(tok(" " + target, add_special_tokens=False).input_ids)

    kinds = ("rewrite", "para", "neigh")
    passed = {k: 0 for k in kinds}
    failures = []
    print(f"{'case':>4}  {'subject':<28} {'true':<15} {'new':<15} {'rewrite':>8} {'para':>8} {'neigh':>8}  ok")
    for i, r in enumerate(requests):
        worst = {k: min(margins[(i, k)]) if (i, k) in margins else None for k in kinds}
        ok = {k: worst[k] is None or worst[k] > args.margin for k in kinds}
        for k in kinds:
            passed[k] += ok[k] and worst[k] is not None
        if not all(ok.values()):
            failures.append(r.case_id)
        cells = " ".join(f"{'-' if worst[k] is None else f'{worst[k]:+.2f}':>8}" for k in kinds)
        flags = "".join("." if ok[k] else k[0].upper() for k in kinds)
        print(f"{r.case_id!s:>4}  {r.subject[:28]:<28} {r.target_true[:15]:<15} {r.target_new[:15]:<15} {cells}  {flags}")

    have = {k: sum((i, k) in margins for i in range(len(requests))) for k in kinds}
    print(f"\n{len(requests)} records; passing (records with such prompts): "
          + ", ".join(f"{k} {passed[k]}/{have[k]}" for k in kinds)
          + f"; prompts: {len(rows)}; margin > {args.margin}")
    targets = [t for r in requests for t in (r.target_new, r.target_true)]
    single = sum(n_tokens(t) == 1 for t in targets)
    print(f"targets encoding to a single token (with leading space): {single}/{len(targets)}; "
          f"records with both targets single-token: "
          f"{sum(n_tokens(r.target_new) == 1 and n_tokens(r.target_true) == 1 for r in requests)}/{len(requests)}")
    if failures:
        if args.verbose:
            print("failing prompts:", *failing_prompts, sep="\n")
        print(f"FAILED: {len(failures)} record(s) the model does not demonstrably know: {failures}")
        return 1
    print("OK: the unedited model prefers the true target on every prompt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
