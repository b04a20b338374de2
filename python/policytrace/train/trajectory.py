"""Trajectory attribution: each pair's share of every optimizer step of the fine-tune that ran,
under the optimizer's own preconditioning and momentum (docs/design.md, "Trajectory mode").

The recorded run (``records.json`` of :mod:`.finetune` or of the Trainer callback) took steps
``s = 1..S``, each ``M_s = μ M_{s−1} + γ κ_s Σ_{i∈B_s} c_{i,s} g_{i,s}`` and
``θ_s = (1 − lr_s λ) θ_{s−1} − lr_s α_s u_s ⊙ M_s`` (:mod:`.optim`). Given the preconditioner
``u_s`` and the clip factor ``κ_s`` as recorded, everything is linear in the per-example
gradients, so the displacement ``θ_s − θ_0`` splits exactly into one part per pair plus the decay
of ``θ_0``: pair i's part ``D_{i,s} = (1 − lr_s λ) D_{i,s−1} − lr_s α_s u_s ⊙ M_{i,s}``, its
momentum ``M_{i,s} = μ M_{i,s−1} + γ κ_s c_{i,s} g_{i,s}``. Its share of step s is
``D_{i,s} − D_{i,s−1}``, and its contribution to a concept φ is the path sum
``Σ_s ⟨G_s, D_{i,s} − D_{i,s−1}⟩`` with ``G_s`` the concept gradient ``∇φ`` along step s: by
default the gradients at the checkpoints around the step interpolated to its middle (second
order), or the one at the checkpoint before it (:data:`ConceptPath`). The adjoint
(summation by parts) gives it as ``Σ_{t: i∈B_t} κ_t c_{i,t} ⟨q_t, g_{i,t}⟩``:

    H_S = G_S,  H_s = G_s − G_{s+1} + (1 − lr_{s+1} λ) H_{s+1}
    P_s = −lr_s α_s u_s ⊙ H_s + μ P_{s+1},  q_t = γ P_t

With G a fixed combination of the checkpoints' gradients at each step and u constant over
slots (one per step, ``train.precondition = "step"``, or one per checkpoint segment,
``"checkpoint"``), ``q_t`` is a
combination ``Σ_{j,k} E[t, j, k] · u_j ⊙ G_k`` whose scalar weights come from the same recursion
(:func:`weights`); a replay of the run forms ``q_t`` at each step and takes the batch's
per-example products ``⟨q_t, g_{i,t}⟩`` in one hooked backward (:mod:`policytrace.gradients`).

The shares hold AdamW's second moment as recorded. ``train.second_moment = "differentiated"``
adds what a pair's loss weight changes through it: ``v_t`` holds ``Σ_{s≤t} β2^{t−s}(1−β2) x_s²``
(``x_s = κ_s Σ c g`` the step's batch gradient), so raising pair i's weight at step s also shrinks
every later step's ``u_t``. With ``r_t = √(v_t / bc2_t)``, ``u_t = 1/(r_t + ε)`` and
``e_t = lr_t α_t (m_t ⊙ u_t) ⊙ u_t / (bc2_t r_t)`` (0 where ``r_t = 0``), the derivative of the
concept's path sum adds ``κ_s c_{i,s} ⟨Qv_s, g_{i,s}⟩`` with

    Qv_s = (1 − β2) x_s ⊙ Σ_{t≥s} β2^{t−s} (H_t ⊙ e_t)

and ``H_t`` as above. AdamW's step is scale-free (m and √v both scale with the weights), so these
derivatives sum over all pairs to about zero, not to the change: they say what re-weighting or
removing pairs does when Adam renormalises, and completeness is checked on the shares.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch

from .. import _progress
from ..errors import InvalidValueError, RunFolderError
from ..gradients.batched import TrainExample, WholeProducts, per_example
from .config import TrainCfg
from .finetuning import load_tensors, trained_tensors, weighted_loss
from .optim import Optimizer, coefficients


@dataclass(frozen=True)
class Records:
    """A recorded fine-tune: its recipe, trained tensors, steps and checkpoints."""

    folder: Path
    recipe: TrainCfg
    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    steps: list[dict]
    checkpoints: list[int]
    precondition: str
    ids: list[str]
    model: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def S(self) -> int:
        return len(self.steps)


def load_records(folder) -> Records:
    """``folder/records.json`` (a finished ``policytrace finetune`` or callback folder)."""
    folder = Path(folder)
    f = folder / "records.json"
    if not f.is_file():
        raise RunFolderError(f"{folder} holds no records.json: point train.records at a folder written by "
                             "`policytrace finetune` or the Trainer callback, after it finished")
    try:
        doc = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise RunFolderError(f"{f} is damaged ({e}); rerun the fine-tune into a new folder") from e
    if doc.get("format") != "policytrace.finetune":
        raise RunFolderError(f"{f} is not a policytrace fine-tune record")
    from .._tables import from_mapping

    recipe = from_mapping(TrainCfg, {k: v for k, v in doc["recipe"].items()})
    return Records(folder, recipe, list(doc["trained"]), {n: tuple(s) for n, s in doc["trained"].items()},
                   doc["steps"], list(doc["checkpoints"]), doc.get("precondition", recipe.precondition),
                   list(doc["ids"]), doc.get("model", ""), {k: doc[k] for k in ("callback",) if k in doc})


# --- the scalar recursion ------------------------------------------------------------------


ConceptPath = Literal["midpoint", "start"]
"""How G_s, the concept gradient step s is weighed by, comes from the refresh points: "start",
the gradient at the point before the step (piecewise constant, first order); "midpoint", the
gradients at the two points around the step interpolated to the step's middle (second order:
the path sum's error falls with the square of the segment length; one more concept pass, at the
final checkpoint)."""


def refresh_points(rec: Records, path: ConceptPath = "midpoint") -> list[int]:
    """Steps whose weights the concept gradients are taken at: θ_0 and every checkpoint before
    the last step (segment k covers steps r_k + 1 .. r_{k+1}), and with "midpoint" the final one."""
    pts = [0] + [c for c in rec.checkpoints if c < rec.S]
    if path == "midpoint" and rec.S in rec.checkpoints:
        pts.append(rec.S)
    return pts


def segment(points: list[int], s: int) -> int:
    """Index of the refresh point before step s (1-based): the last one before it."""
    return max(k for k, r in enumerate(points) if r < s)


def path_weights(rec: Records, path: ConceptPath = "midpoint") -> np.ndarray:
    """(S, K): G_s = Σ_k w[s−1, k] G_k over the refresh points (:data:`ConceptPath`)."""
    pts = refresh_points(rec, path)
    w = np.zeros((rec.S, len(pts)))
    for s in range(1, rec.S + 1):
        k = segment(pts, s)
        if path == "midpoint" and k + 1 < len(pts):
            tau = (s - 0.5 - pts[k]) / (pts[k + 1] - pts[k])
            w[s - 1, k], w[s - 1, k + 1] = 1.0 - tau, tau
        else:
            w[s - 1, k] = 1.0
    return w


def slot_steps(rec: Records) -> list[int]:
    """The step whose preconditioner each slot holds: every step ("step"), or for each
    checkpoint segment the checkpoint that ends it ("checkpoint": its optimizer state has seen
    the segment's gradients). SGD has one slot of ones."""
    if rec.recipe.optimizer != "adamw":
        return [rec.S]
    if rec.precondition == "step":
        return list(range(1, rec.S + 1))
    return [c for c in rec.checkpoints]


def slot_of(rec: Records, slots: list[int], s: int) -> int:
    if len(slots) == 1:
        return 0
    return min(j for j, c in enumerate(slots) if c >= s)


def scalars(rec: Records) -> tuple[np.ndarray, np.ndarray, float, float, float]:
    """Per step lr_s and α_s (index s − 1), and μ, γ, λ."""
    lr = np.array([st["lr"] for st in rec.steps], dtype=np.float64)
    alpha = np.array([coefficients(rec.recipe, s)[2] for s in range(1, rec.S + 1)])
    mu, gamma, _ = coefficients(rec.recipe, 1)
    return lr, alpha, mu, gamma, rec.recipe.weight_decay


def h_weights(rec: Records, path: ConceptPath = "midpoint") -> np.ndarray:
    """(S, K): H_s = Σ_k h[s−1, k] G_k (H_S = G_S, H_s = G_s − G_{s+1} + (1 − lr_{s+1} λ) H_{s+1})."""
    w = path_weights(rec, path)
    lr, _, _, _, lam = scalars(rec)
    h = np.zeros_like(w)
    h[-1] = w[-1]
    for s in range(rec.S - 1, 0, -1):  # s is 1-based; row s - 1
        h[s - 1] = (1.0 - lr[s] * lam) * h[s] + w[s - 1] - w[s]
    return h


def weights(rec: Records, path: ConceptPath = "midpoint") -> np.ndarray:
    """(S, J, K): q_t = Σ_{j,k} E[t−1, j, k] · u_j ⊙ G_k."""
    h = h_weights(rec, path)
    lr, alpha, mu, gamma, _ = scalars(rec)
    slots = slot_steps(rec)
    S, K = h.shape
    E = np.zeros((S, len(slots), K))
    P = np.zeros((len(slots), K))
    for t in range(S, 0, -1):
        P = mu * P
        P[slot_of(rec, slots, t)] += -lr[t - 1] * alpha[t - 1] * h[t - 1]
        E[t - 1] = gamma * P
    return E


def decay_weights(rec: Records) -> np.ndarray:
    """(S, J): the final displacement is Σ_t Σ_j F[t−1, j] u_j ⊙ x_t (x_t the step's clipped,
    weighted batch gradient part), the adjoint with G = identity at the end: H_s = Π_{r>s}(1 − lr_r λ)."""
    lr, alpha, mu, gamma, lam = scalars(rec)
    slots = slot_steps(rec)
    S = rec.S
    rho = np.ones(S)
    for s in range(S - 1, 0, -1):
        rho[s - 1] = rho[s] * (1.0 - lr[s] * lam)
    F = np.zeros((S, len(slots)))
    P = np.zeros(len(slots))
    for t in range(S, 0, -1):
        P = mu * P
        P[slot_of(rec, slots, t)] += -lr[t - 1] * alpha[t - 1] * rho[t - 1]
        F[t - 1] = gamma * P
    return F


# --- the replay ----------------------------------------------------------------------------


def preconditioners(rec: Records, dtype, device) -> list[dict[str, torch.Tensor]] | None:
    """u_j per slot (None for sgd: u = 1)."""
    if rec.recipe.optimizer != "adamw":
        return None
    out = []
    b2, eps = rec.recipe.betas[1], rec.recipe.eps
    for c in slot_steps(rec):
        if rec.precondition == "step":
            f = rec.folder / "precond" / f"step-{c}.safetensors"
            if not f.is_file():
                raise RunFolderError(f"{f} is missing: the fine-tune recorded no per-step preconditioner; set "
                                     'train.precondition = "checkpoint" or fine-tune again with "step"')
            u = load_tensors(f)
        else:
            v = load_tensors(checkpoint_dir(rec, c) / "optimizer.safetensors")
            bc2 = 1.0 - b2**c
            u = {n: 1.0 / ((v[f"v.{n}"].double().sqrt() / math.sqrt(bc2)) + eps) for n in rec.names}
        out.append({n: u[n].to(dtype=dtype, device=device) for n in rec.names})
    return out


def checkpoint_dir(rec: Records, step: int) -> Path:
    d = rec.folder / "checkpoints" / f"step-{step}"
    if not (d / "trained.safetensors").is_file():
        raise RunFolderError(f"{d} is missing or incomplete; the fine-tune's checkpoints are needed to attribute it")
    return d


def flat(tensors: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1) for n in names])


class Replay:
    """Walks the recorded run from θ_0, the model's trained tensors holding θ_{t−1} when step t
    is visited; after each step they are advanced by the recipe's optimizer on the recorded batch,
    and set to the checkpoint's own tensors (and its optimizer state) at every checkpoint, so any
    rounding difference of a replay (a callback's run under another optimizer implementation)
    never accumulates past a checkpoint."""

    def __init__(self, model, rec: Records, examples: list[TrainExample], pad_id: int) -> None:
        self.model, self.rec, self.examples, self.pad = model, rec, examples, pad_id
        self.params = trained_tensors(model, rec.names)
        for n in rec.names:
            if tuple(self.params[n].shape) != rec.shapes[n]:
                raise RunFolderError(f"{rec.folder}: trained tensor '{n}' has shape {list(rec.shapes[n])} there but "
                                     f"{list(self.params[n].shape)} in this model (a fine-tune of another model)")
        self.base = {n: p.detach().clone() for n, p in self.params.items()}
        self.opt = Optimizer(rec.recipe, {n: p.detach() for n, p in self.params.items()})
        self.device = next(model.parameters()).device

    def set(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(tensors[n])

    def restore(self) -> None:
        self.set(self.base)

    def at_checkpoint(self, step: int) -> dict[str, torch.Tensor]:
        return load_tensors(checkpoint_dir(self.rec, step) / "trained.safetensors")

    def batch_gradient(self, st: dict, mask: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """Σ_{i∈B} c_i g_i at the current weights (``mask``: only the examples it marks)."""
        idx = st["examples"]
        coef = np.asarray(st["coef"], dtype=np.float64)
        if mask is not None:
            coef = coef * mask
        grads = {n: torch.zeros_like(p) for n, p in self.params.items()}
        if not coef.any():
            return grads
        flags = [(n, p.requires_grad) for n, p in self.params.items()]
        for p in self.params.values():
            p.requires_grad_(True)
        try:
            bs = self.rec.recipe.batch_size
            for lo in range(0, len(idx), bs):
                part = [self.examples[i] for i in idx[lo:lo + bs]]
                loss = weighted_loss(self.model, part, coef[lo:lo + bs], self.pad, self.device)
                g = torch.autograd.grad(loss, list(self.params.values()), allow_unused=True)
                for n, gi in zip(self.params, g):
                    if gi is not None:
                        grads[n] += gi
        finally:
            for n, flag in flags:
                self.params[n].requires_grad_(flag)
        return grads

    def advance(self, t: int, grads: dict[str, torch.Tensor] | None = None) -> None:
        """θ_{t−1} → θ_t."""
        st = self.rec.steps[t - 1]
        if t in self.rec.checkpoints and (self.rec.folder / "checkpoints" / f"step-{t}").is_dir():
            d = checkpoint_dir(self.rec, t)
            self.set(load_tensors(d / "trained.safetensors"))
            if (d / "optimizer.safetensors").is_file():
                self.opt.load(load_tensors(d / "optimizer.safetensors"), t)
            else:
                self.opt.step_count = t
            return
        g = grads if grads is not None else self.batch_gradient(st)
        self.opt.step({n: p.detach() for n, p in self.params.items()}, g, st["lr"], st["clip"])


@dataclass
class Attribution:
    """Per pair and concept, the path-sum contributions (P, C); per step, each batch member's
    (the ``steps`` rows: step, epoch, pair index, contribution per concept); the decay of θ_0's
    part (C,), and the path sum Σ_s ⟨G_s, θ_s − θ_{s−1}⟩ of the replayed updates (C,), which the
    pairs and the decay add up to exactly when the preconditioner is per step."""

    values: np.ndarray
    step_rows: list[tuple[int, int, int, np.ndarray]]
    decay: np.ndarray
    path: np.ndarray
    seconds: dict = field(default_factory=dict)
    shares: np.ndarray | None = None
    """The pairs' shares of the updates (P, C) when ``values`` also holds the second moment's
    derivative (``second_moment = "differentiated"``); None when they are ``values``."""


SecondMoment = Literal["fixed", "differentiated"]
"""How trajectory mode treats AdamW's second moment (module docstring): "fixed", the recorded
preconditioner (the pairs' shares add up to the run's update); "differentiated", also through
v̂ (the derivative with respect to a pair's loss weight; sgd has no second moment)."""


ConceptFn = Callable[[], torch.Tensor]
"""Concept gradients (C, D) at the model's current weights, in the records' tensor order."""


def concept_gradients_at_points(replay: Replay, rec: Records, grads_fn: ConceptFn, log,
                                path: ConceptPath = "midpoint") -> list[torch.Tensor]:
    out = []
    for r in refresh_points(rec, path):
        replay.set(replay.base if r == 0 else replay.at_checkpoint(r))
        log(f"trajectory: concept gradients at step {r}")
        out.append(grads_fn())
    replay.restore()
    return out


def moment_factors(model, rec: Records, examples: list[TrainExample], pad_id: int) -> list[torch.Tensor]:
    """``e_t`` (module docstring) for t = 1..S, flat float64 (``1/r³`` overflows float32 where
    a coordinate's gradients are tiny), from a replay of the run's AdamW state of its own."""
    replay = Replay(model, rec, examples, pad_id)
    b2, eps = rec.recipe.betas[1], rec.recipe.eps
    lr, alpha, _, _, _ = scalars(rec)
    out = []
    for t in range(1, rec.S + 1):
        replay.advance(t)
        bc2 = 1.0 - b2**t
        m = flat(replay.opt.m, rec.names).double()
        r = (flat(replay.opt.v, rec.names).double() / bc2).sqrt()
        u = 1.0 / (r + eps)
        e = (lr[t - 1] * alpha[t - 1] / bc2) * m * u * u / r
        out.append(torch.where(r > 0, e, torch.zeros_like(e)))
    replay.restore()
    return out


def moment_vector(e: list[torch.Tensor], h: np.ndarray, G: list[torch.Tensor], x: torch.Tensor, s: int,
                  beta2: float) -> torch.Tensor:
    """Qv_s (C, D) = (1 − β2) x_s ⊙ Σ_k G_k ⊙ Σ_{t≥s} β2^{t−s} h[t−1, k] e_t."""
    out = torch.zeros_like(G[0])
    for k in range(len(G)):
        acc = torch.zeros_like(e[0])
        for t in range(s, len(e) + 1):
            if h[t - 1, k]:
                acc += (beta2 ** (t - s) * h[t - 1, k]) * e[t - 1]
        if acc.any():
            out += G[k] * ((1.0 - beta2) * x.double() * acc).to(G[k].dtype)
    return out


def attribute(model, rec: Records, examples: list[TrainExample], pad_id: int, grads_fn: ConceptFn,
              progress: bool = False, log=lambda m: None, G: list[torch.Tensor] | None = None,
              path: ConceptPath = "midpoint", second_moment: SecondMoment = "fixed") -> Attribution:
    """Every pair's contribution to every concept (module docstring), by one replay of the run.
    ``G``: the concept gradients at the refresh points, when the caller has them; ``path``: how
    the steps between them weigh them (:data:`ConceptPath`); ``second_moment``: whether AdamW's
    v̂ is held as recorded or differentiated too (:data:`SecondMoment`; one more replay)."""
    import time

    check_examples_match(rec, examples)
    replay = Replay(model, rec, examples, pad_id)
    t0 = time.perf_counter()
    G = G if G is not None else concept_gradients_at_points(replay, rec, grads_fn, log, path)
    t1 = time.perf_counter()
    dtype = G[0].dtype
    U = preconditioners(rec, dtype, replay.device)
    Uflat = [flat(u, rec.names) for u in U] if U is not None else None
    E = weights(rec, path)
    h = h_weights(rec, path)
    w = path_weights(rec, path)
    pts = refresh_points(rec, path)
    lr, _, _, _, lam = scalars(rec)
    C = G[0].shape[0]
    values = np.zeros((len(examples), C))
    moments = second_moment == "differentiated" and rec.recipe.optimizer == "adamw"
    e = moment_factors(model, rec, examples, pad_id) if moments else None
    shares = np.zeros((len(examples), C)) if moments else None
    rows = []
    walked = np.zeros(C)  # the path sum of the replayed updates
    base_flat = flat(replay.base, rec.names).to(dtype)
    decay = np.zeros(C)
    if lam:
        for s in range(1, rec.S + 1):
            for k in range(len(pts)):
                if h[s - 1, k]:
                    decay += -lr[s - 1] * lam * h[s - 1, k] * (G[k] @ base_flat).double().cpu().numpy()
    bar = _progress.bar(rec.S, "replayed step", progress)
    for t in range(1, rec.S + 1):
        st = rec.steps[t - 1]
        q = torch.zeros_like(G[0])
        for j in range(E.shape[1]):
            for k in range(E.shape[2]):
                if E[t - 1, j, k]:
                    q += E[t - 1, j, k] * (G[k] * Uflat[j] if Uflat is not None else G[k])
        batch = [examples[i] for i in st["examples"]]
        out = _products(model, rec, q, batch, pad_id, replay.device, st)
        grads = None
        if moments:
            grads = replay.batch_gradient(st)
            qv = moment_vector(e, h, G, st["clip"] * flat(grads, rec.names), t, rec.recipe.betas[1])
            np.add.at(shares, st["examples"], out)
            out = out + _products(model, rec, qv, batch, pad_id, replay.device, st)
        for b, i in enumerate(st["examples"]):
            values[i] += out[b]
            rows.append((t, st["epoch"], i, out[b]))
        before = flat(replay.params, rec.names).detach().clone()
        replay.advance(t, grads)
        delta = (flat(replay.params, rec.names).detach() - before).to(dtype)
        for k in np.flatnonzero(w[t - 1]):
            walked += float(w[t - 1, k]) * (G[k] @ delta).double().cpu().numpy()
        bar.update(1)
    bar.close()
    replay.restore()
    return Attribution(values, rows, decay, walked, {"concept_gradients": round(t1 - t0, 3),
                                                   "replay": round(time.perf_counter() - t1, 3)}, shares)


def _products(model, rec: Records, q: torch.Tensor, batch: list[TrainExample], pad_id: int, device,
              st: dict) -> np.ndarray:
    """(B, C): κ_t c_{i,t} ⟨q_c, g_{i,t}⟩ for the step's batch at the model's current weights."""
    sink = WholeProducts(q, rec.names, rec.shapes, "sgd", -1.0, len(batch))
    per_example(model, rec.names, sink, batch, pad_id, device)
    return sink.result().cpu().numpy() * st["clip"] * np.asarray(st["coef"])[:, None]


def recorded_examples(folder) -> list[TrainExample]:
    """The examples a fine-tune trained on (``examples.json``), in its order."""
    f = Path(folder) / "examples.json"
    if not f.is_file():
        raise RunFolderError(f"{f} is missing: the fine-tune did not record its examples; pass examples=")
    return [TrainExample(tuple(ids), tuple(bool(t) for t in tr)) for ids, tr in json.loads(f.read_text())]


def base_model(folder):
    """The fine-tune's base model, loaded as the records name it (``base_model``)."""
    from ..model.config import ModelCfg
    from ..model.loading import load_model_cfg

    doc = json.loads((Path(folder) / "records.json").read_text())
    b = doc.get("base_model")
    if not b:
        raise RunFolderError(f"{folder}/records.json does not name its base model; pass model=")
    lm = load_model_cfg(ModelCfg(name=b["name"], dtype=b.get("dtype", "float32"),
                                 device=b.get("device", "cpu"), chat_template=b.get("chat_template", ""),
                                 gguf_file=b.get("gguf_file", "")))
    if lm.identity != doc.get("model"):
        raise RunFolderError(f"the model {b.get('label', b['name'])} is not the one {folder} fine-tuned (its files changed)")
    return lm


def check_examples_match(rec: Records, examples: list[TrainExample]) -> None:
    need = max((i for st in rec.steps for i in st["examples"]), default=-1) + 1
    if len(examples) < need or len(examples) != len(rec.ids):
        raise InvalidValueError(f"{rec.folder} trained on {len(rec.ids)} examples, {len(examples)} given")


def attributed_update(run, pair_ids, model=None, examples: list[TrainExample] | None = None,
                      pad_id: int | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Σ over the pairs ``pair_ids`` of their share of every step's update: the part of the
    fine-tuned weights' displacement ``θ_S − θ_0`` those pairs account for (module docstring),
    per trained tensor, for first-order removal: ``θ_S − attributed_update(...)``. Exact (the
    pairs' parts and the decay of θ_0 add up to θ_S − θ_0 to rounding) with
    ``train.precondition = "step"``; with ``"checkpoint"`` the preconditioner of each segment is
    the checkpoint's.

    ``run``: the fine-tune's folder (``records.json``); ``model``: the base model (default: loaded
    as the records name it; its trained tensors are restored after the replay); ``examples``:
    the fine-tune's, in its order (default: the recorded ``examples.json``)."""
    rec = run if isinstance(run, Records) else load_records(run)
    if examples is None:
        examples = recorded_examples(rec.folder)
    if model is None:
        lm = base_model(rec.folder)
        model = lm.model
        if pad_id is None:
            pad_id = lm.tokenizer.pad_token_id
    check_examples_match(rec, examples)
    want = set(pair_ids)
    unknown = want - set(rec.ids)
    if unknown:
        raise InvalidValueError(f"pair ids not in {rec.folder}'s fine-tune: {sorted(unknown)[:5]}")
    sel = np.array([i in want for i in rec.ids])
    pad = 0 if pad_id is None else pad_id
    replay = Replay(model, rec, examples, pad)
    dtype = next(iter(replay.params.values())).dtype
    U = preconditioners(rec, torch.float64 if dtype == torch.float64 else dtype, replay.device)
    F = decay_weights(rec)
    Y = [{n: torch.zeros_like(p, dtype=p.dtype) for n, p in replay.params.items()} for _ in range(F.shape[1])]
    bar = _progress.bar(rec.S, "replayed step", progress)
    for t in range(1, rec.S + 1):
        st = rec.steps[t - 1]
        mask = sel[np.asarray(st["examples"])].astype(np.float64)
        x = replay.batch_gradient(st, mask) if mask.any() else None
        if x is not None:
            for j in range(F.shape[1]):
                if F[t - 1, j]:
                    for n in rec.names:
                        Y[j][n] += F[t - 1, j] * st["clip"] * x[n]
        replay.advance(t)
        bar.update(1)
    bar.close()
    replay.restore()
    out = {}
    for n in rec.names:
        acc = torch.zeros_like(Y[0][n])
        for j in range(F.shape[1]):
            acc += Y[j][n] * (U[j][n].to(acc.dtype) if U is not None else 1.0)
        out[n] = acc
    return out


def decay_displacement(run, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The part of θ_S − θ_0 that no pair accounts for: weight decay acting on θ_0
    (Σ_s Π_{r>s}(1 − lr_r λ) · (−lr_s λ) θ_0; zero without decay)."""
    rec = run if isinstance(run, Records) else load_records(run)
    lr, _, _, _, lam = scalars(rec)
    factor, rho = 0.0, 1.0
    for s in range(rec.S, 0, -1):
        factor += rho * (-lr[s - 1] * lam)
        rho *= 1.0 - lr[s - 1] * lam
    return {n: factor * base[n] for n in rec.names}
