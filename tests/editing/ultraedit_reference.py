"""A plain float64 re-implementation of the official UltraEdit turn (XiaojieGu/UltraEdit: editor/ultraedit.py,
nets.py::RunningMeanStd, util.py::cross_entropy and Tracer; StableEdit's options from MINE-USTC/StableEdit),
written from the official loop, not from sphere_pl's code: one unpadded forward pass per request, the
statistics merged by explicit formulas, the solve in float64.
"""

from __future__ import annotations

import copy

import torch


def _request_rows(model, tok, request, module_names):
    """For one request, alone and unpadded: its answer tokens' CE terms and, per module, keys and d(sum of CE)/d(output)."""
    prompt = tok(request.rewrite_prompt)["input_ids"]
    answer = tok(" " + request.target_new, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + answer[:-1]])
    positions = list(range(len(prompt) - 1, len(prompt) - 1 + len(answer)))
    inputs, outputs = {}, {}

    def record(name):
        def hook(module, args, output):
            inputs[name], outputs[name] = args[0][0], output
        return hook

    handles = [model.get_submodule(n).register_forward_hook(record(n)) for n in module_names]
    embed = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.detach().requires_grad_(True))
    try:
        with torch.enable_grad():
            logits = model(input_ids=ids).logits[0]
            token_ce = torch.nn.functional.cross_entropy(logits[positions], torch.tensor(answer), reduction="none")
            grads = torch.autograd.grad(token_ce.sum(), [outputs[n] for n in module_names])
    finally:
        for h in handles + [embed]:
            h.remove()
    return len(prompt) + len(answer) - 1, len(answer), {n: (inputs[n][positions].detach(), g[0][positions].detach()) for n, g in zip(module_names, grads)}


def _merge(stats, x, variance):
    """nets.py::RunningMeanStd.update, in float64 (`variance`: 'ultraedit' m·unbiased, 'exact' m·biased);
    plus StableEdit's covariance of the gradient part."""
    m = x.shape[0]
    if stats is None:
        stats = {"n": 0.0, "mean": torch.zeros(x.shape[1], dtype=x.dtype), "m2": torch.zeros(x.shape[1], dtype=x.dtype)}
    n = stats["n"] + m
    batch_mean = x.sum(0) / m
    centred = x - batch_mean
    batch_var = (centred ** 2).sum(0) / ((m - 1) if variance == "ultraedit" else m)
    delta = batch_mean - stats["mean"]
    new = {"n": n, "mean": stats["mean"] + m * delta / n, "m2": stats["m2"] + m * batch_var + stats["n"] * m * delta ** 2 / n}
    return new


def _merge_covariance(cov, n_before, g):
    m = g.shape[0]
    n = n_before["n"] + m
    mean_before = n_before["g_mean"]
    batch_mean = g.sum(0) / m
    centred = g - batch_mean
    delta = batch_mean - mean_before
    return (cov if cov is not None else torch.zeros(g.shape[1], g.shape[1], dtype=g.dtype)) + centred.T @ centred + n_before["n"] * m / n * torch.outer(delta, delta)


def ultraedit_turn(model, tok, requests, module_names, statistics, lr, ridge, mini_batch, variance="ultraedit", whitening="diagonal"):
    """One turn: {module: ΔW (nn.Linear layout, float64)} and the statistics after it. `model` is used in
    float64 (a copy); `statistics` maps a module's weight shape to its statistics (updated copy returned)."""
    model = copy.deepcopy(model).double()
    statistics = copy.deepcopy(statistics)
    rows = sorted((_request_rows(model, tok, r, module_names) for r in requests), key=lambda row: row[0], reverse=True)
    keys = {n: [] for n in module_names}
    grads = {n: [] for n in module_names}
    for start in range(0, len(rows), mini_batch):
        part = rows[start : start + mini_batch]
        tokens = sum(answer_tokens for _, answer_tokens, _ in part)  # CE is the mean over the mini-batch's answer tokens
        for n in module_names:
            k = torch.cat([reads[n][0] for _, _, reads in part])
            g = torch.cat([reads[n][1] for _, _, reads in part]) / tokens
            shape = tuple(model.get_submodule(n).weight.shape)
            before = statistics.get(shape)
            after = _merge(before, torch.cat([k, g], 1), variance)
            if whitening == "full":
                previous = {"n": before["n"] if before else 0.0, "g_mean": before["mean"][k.shape[1]:] if before else torch.zeros(g.shape[1], dtype=g.dtype)}
                after["cov"] = _merge_covariance(before.get("cov") if before else None, previous, g)
            statistics[shape] = after
            keys[n].append(k)
            grads[n].append(g)
    deltas = {}
    eps = torch.finfo(torch.float32).eps  # the official epsilon (of the float32 rows)
    for n in module_names:
        k, g = torch.cat(keys[n]), torch.cat(grads[n])
        stats = statistics[tuple(model.get_submodule(n).weight.shape)]
        std = (stats["m2"] / (stats["n"] - 1 + eps)).sqrt()
        z = (torch.cat([k, g], 1) - stats["mean"]) / (std + eps)
        k_hat, g_hat = z[:, : k.shape[1]], z[:, k.shape[1]:]
        d_out = g.shape[1]
        if whitening == "full" and stats["n"] > d_out + 1:
            sigma = stats["cov"] / (stats["n"] - d_out - 1 + eps)
            w, u = torch.linalg.eigh(sigma)
            g_hat = (g - stats["mean"][k.shape[1]:]) @ (u @ torch.diag(w.clamp(min=1e-6) ** -0.5) @ u.T)
        v = -lr * (k_hat ** 2).sum(1, keepdim=True) * g_hat
        x = torch.linalg.solve(k.T @ k + ridge * torch.eye(k.shape[1], dtype=k.dtype), k.T @ v)
        deltas[n] = x.T
    return deltas, statistics
