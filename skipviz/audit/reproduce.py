"""Reproducing stored records: re-run a record's whole batch from its stored sources and compare decisions and
logits bit-for-bit on CPU (within :data:`~skipviz.audit.records.GPU_ATOL` elsewhere, with deterministic
algorithms).

Reproducing a record re-runs its whole batch: the engine runs each block on the samples that execute it,
packed together, so a sample's floating-point result depends on which other samples shared its batch
(convolution kernels pick different algorithms for different batch sizes). Replaying the same batch makes
bit-for-bit comparison valid.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from .._imageio import ImageLoadError, load_image
from ..engine.resume import full_logits
from ..models._registry import create_model, list_models
from ..policies.config import policy_from_config
from .archive import ArchiveError, InputItem, read_source
from .records import GPU_ATOL, AuditRecord, AuditRun, ReproResult
from .run import params_sha256
from .shadow import SHADOW_NOT_CHECKED, SHADOW_REUSED, SHADOW_RUN
from .store import AuditStore, StoreError, open_store

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.network import SkipNetwork
    from ..engine.trace import SampleTrace

__all__ = ["rebuild_model", "reproduce", "reproduce_many", "reproduce_sample"]


def rebuild_model(record: AuditRecord) -> "SkipNetwork":
    """The network a record was made with, from its weights file (checked against the stored hashes)."""
    arch, _, tag = record.model_name.partition(".")
    if not tag:
        raise StoreError(f"record {record.record_id} used a randomly initialised {arch}: pass the same network "
                         "object (net=...) to reproduce it")
    if record.model_name not in list_models(pretrained=True):
        raise StoreError(f"record {record.record_id} used {record.model_name}, weights not registered or not present "
                         "here (a local weights file?): load that network and pass it (net=...) to reproduce it")
    net = create_model(record.model_name)
    if record.weights_sha256 and net.meta.weights_sha256 != record.weights_sha256:
        raise StoreError(f"{record.model_name}: weights file changed since the audit (sha256 "
                         f"{net.meta.weights_sha256} != recorded {record.weights_sha256})")
    return net


@contextlib.contextmanager
def _deterministic(enabled: bool):
    before = torch.are_deterministic_algorithms_enabled()
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _max_diff(a: Sequence[float | None], b: Sequence[float | None]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        if (x is None) != (y is None):
            return math.inf
        if x is not None and not (math.isnan(x) and math.isnan(y)):
            worst = max(worst, abs(x - y))
    return worst


def _load_source(rec: AuditRecord, sources: dict[int, bytes] | None,
                 archives: dict[str, dict[str, InputItem]] | None = None) -> Image.Image:
    """A record's input image again, hash-checked; ``archives`` caches zip archives across a batch."""
    if sources and rec.record_id in sources:
        data: bytes | str = sources[rec.record_id]
    elif rec.input_path:
        data = read_source(rec.input_path, cache=archives)
    else:
        raise StoreError(f"{rec.input_name}: was uploaded and its bytes are no longer available")
    image, info = load_image(data)
    if info.sha256 != rec.input_sha256:
        raise StoreError(f"{rec.input_name}: input changed since the audit (sha256 {info.sha256[:12]} != recorded "
                         f"{str(rec.input_sha256)[:12]})")
    return image


def reproduce_many(store: AuditStore | str | Path, record_ids: Iterable[int], net: "SkipNetwork | None" = None,
                   sources: dict[int, bytes] | None = None, device: str | torch.device | None = None,
                   atol: float = GPU_ATOL) -> list[ReproResult]:
    """Re-run stored records (grouped so that each batch is replayed once) and compare with what was stored.

    Each record's whole batch is reloaded from its sources (paths, zip members or ``sources`` bytes), the
    input hashes are checked, the policy is rebuilt with :func:`policy_from_config`, and the batch is run with
    ``torch.use_deterministic_algorithms(True)``. A record that cannot be replayed (file gone or changed,
    weights changed) gives a result with ``reproduced=False`` and the reason in ``message``.
    """
    st, owned = open_store(store)
    try:
        wanted = st.query(record_ids=list(record_ids))
        results: list[ReproResult] = []
        groups: dict[tuple[str, int], list[AuditRecord]] = {}
        for rec in wanted:
            if not rec.ok:
                results.append(ReproResult(rec.record_id, rec.input_name, False, False, False, False, False,
                                           math.inf, math.inf, 0.0, "", "failed input: nothing to reproduce"))
                continue
            groups.setdefault((rec.run_id, int(rec.batch_index)), []).append(rec)
        for (run_id, b), targets in groups.items():
            results.extend(_replay_batch(st, run_id, b, targets, net, sources, device, atol))
        order = {r.record_id: i for i, r in enumerate(wanted)}
        return sorted(results, key=lambda r: order.get(r.record_id, 0))
    finally:
        if owned:
            st.close()


def _compare(t: AuditRecord, new: "SampleTrace", full: torch.Tensor | None, exact: bool, tol: float, atol: float,
             dev: torch.device) -> ReproResult:
    """Record ``t`` against its replay: the skipped run's trace ``new`` and the full network's logits ``full``
    (``(K,)``; ``None`` when the audit has none for this input)."""
    old = t.trace
    decisions = ([b.executed for b in new.blocks] == [b["executed"] for b in old["blocks"]]
                 and [b.reason for b in new.blocks] == [b["reason"] for b in old["blocks"]]) if exact else (
        [b.executed for b in new.blocks] == [b["executed"] for b in old["blocks"]])
    score_diff = _max_diff([b.score for b in new.blocks], [b["score"] for b in old["blocks"]])
    logit_diff = _max_diff(new.logits, old["logits"])
    if full is None:  # not checked: the audit has no full output for this input
        full_diff, full_pred_ok, full_ok = 0.0, True, True
    else:
        full_diff = _max_diff([float(v) for v in full], t.full_logits or [])
        full_pred_ok = int(full.argmax()) == t.full_predicted_index
        full_ok = full_diff <= (max(tol, atol) if t.shadow == SHADOW_REUSED else tol)
    pred = new.predicted_index == t.predicted_index and full_pred_ok
    logits_ok = logit_diff <= tol and score_diff <= tol
    ok = decisions and pred and logits_ok and full_ok
    what = "bit-for-bit" if exact else f"within {tol:g}"
    if t.shadow == SHADOW_REUSED:
        what = f"(the skipped run {what}; the reused full output within {max(tol, atol):g})"
    msg = (f"reproduced {what}" if ok else
           f"NOT reproduced: decisions {'match' if decisions else 'differ'}, prediction "
           f"{'matches' if pred else 'differs'}, max |logit diff| {logit_diff:.3g}, max |score diff| "
           f"{score_diff:.3g}, full-network max |diff| {full_diff:.3g}")
    if t.shadow == SHADOW_NOT_CHECKED:
        msg += " (skipped run only: this input was not checked against the full network)"
    elif t.shadow == SHADOW_REUSED:
        msg += (f" (its full-network output was reused from record {t.shadow_from}, computed in another "
                f"batch: compared within {max(tol, atol):g})")
    return ReproResult(t.record_id, t.input_name, ok, decisions, pred, logits_ok, full_ok, logit_diff,
                       score_diff, tol, str(dev), msg)


def _replay_batch(store: AuditStore, run_id: str, batch_index: int, targets: list[AuditRecord],
                  net: "SkipNetwork | None", sources: dict[int, bytes] | None, device: str | torch.device | None,
                  atol: float) -> list[ReproResult]:
    def fail(msg: str) -> list[ReproResult]:
        return [ReproResult(t.record_id, t.input_name, False, False, False, False, False, math.inf, math.inf,
                            0.0, str(device or ""), msg) for t in targets]

    try:
        first = targets[0]
        net = net if net is not None else rebuild_model(first)
        if params_sha256(net) != first.params_sha256:
            return fail("the network's weights differ from the audited ones (params sha256 mismatch)")
        if device is not None:
            net = net.to(device)
        dev = next(net.parameters()).device
        siblings = store.query(run_id=run_id, batch_index=batch_index, status="ok")
        siblings.sort(key=lambda r: r.batch_pos)
        archives: dict[str, dict[str, InputItem]] = {}  # each zip read once for the whole batch
        images = [_load_source(r, sources, archives) for r in siblings]
        policy = policy_from_config(first.policy)
        resumed = bool((store.run_info(run_id).get("config") or {}).get("shadow_resumed"))
    except (StoreError, ImageLoadError, ArchiveError, OSError, ValueError, KeyError) as e:
        return fail(f"cannot replay: {e}")
    exact = dev.type == "cpu" and all(t.device == "cpu" for t in targets)
    tol = 0.0 if exact else atol
    net.eval()
    x = net.meta.preprocess(images).to(dev)
    # the full network is replayed on the rows it ran on in the batch (all of them unless the shadow run was
    # sampled); a reused full output was computed in another batch, so it is compared within ``atol``
    ran = [r.batch_pos for r in siblings if r.shadow in (None, SHADOW_RUN)]
    reused = [t.batch_pos for t in targets if t.shadow == SHADOW_REUSED]
    # (resumed from the skipped run, as the audit computed them, when its shadow plan says so)
    with torch.no_grad(), _deterministic(True):
        res = net.run(x, policy, keep_exit_states=resumed)
        traces = res.traces()
        full_of: dict[int, torch.Tensor] = {}
        if ran and resumed:
            full_of.update(zip(ran, full_logits(net, x, res, ran).detach().float().cpu()))
        for rows in ((reused,) if resumed else (ran, reused)):
            if rows:
                xs = x if len(rows) == x.shape[0] else x[torch.tensor(rows, device=x.device)]
                full_of.update(zip(rows, net(xs).detach().float().cpu()))
    return [_compare(t, traces[t.batch_pos], full_of.get(t.batch_pos), exact, tol, atol, dev) for t in targets]


def reproduce(store: AuditStore | str | Path, record: AuditRecord | int, net: "SkipNetwork | None" = None,
              sources: dict[int, bytes] | None = None, device: str | torch.device | None = None,
              atol: float = GPU_ATOL) -> ReproResult:
    """Re-run one stored record (its whole batch) and compare; see :func:`reproduce_many`."""
    rid = record.record_id if isinstance(record, AuditRecord) else int(record)
    if rid is None:
        raise StoreError("the record has no record_id: store it first")
    results = reproduce_many(store, [rid], net=net, sources=sources, device=device, atol=atol)
    if not results:
        raise StoreError(f"no record {rid} in {getattr(store, 'path', store)}")
    return results[0]


def reproduce_sample(run: AuditRun, net: "SkipNetwork | None" = None, k: int = 8, seed: int = 0,
                     store: AuditStore | None = None) -> list[ReproResult]:
    """Reproduce ``k`` successful records of a run: its disagreements first (up to ``k``), the rest drawn at random."""
    ok = [r for r in run.ok_records if r.record_id is not None]
    if not ok or k <= 0:
        return []
    rng = np.random.default_rng(seed)
    disagree = [r.record_id for r in ok if r.agree is False]
    rest = [r.record_id for r in ok if r.agree is not False]
    take = disagree[:k] + list(rng.choice(rest, size=min(len(rest), max(k - len(disagree), 0)), replace=False))
    return reproduce_many(store or run.db_path, sorted(int(i) for i in take), net=net, sources=run.sources)
