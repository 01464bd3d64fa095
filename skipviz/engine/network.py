"""The skipping engine: a residual network whose blocks can be bypassed per input, for real.

A :class:`SkipNetwork` is a stem, an ordered list of :class:`~skipviz.engine.blocks.SkippableBlock` and a head,
plus optional per-block gate heads (decide whether a block runs), a plan head (decides every block at the stem)
and probe heads (a class distribution after every block): :mod:`skipviz.engine.heads`.

:meth:`SkipNetwork.run` executes a batch under a :class:`~skipviz.policies.base.Policy`. For every block only the
samples that execute it are computed; the other samples take the block's bypass (identity, or the shortcut of
a downsampling block). At inference an identity block's executing samples are made contiguous in the batch
(the few misplaced rows swapped, :mod:`skipviz.engine.rows`) and the block updates them in place
(:meth:`SkipNetwork._run_contiguous`); with autograd on, or for a downsampling block, they are gathered, run and
scattered back (:meth:`SkipNetwork._apply_block`). A bypassed block's ``forward`` is never called for that
sample, so the saved FLOPs are saved time too. Nothing is multiplied by zero.

At inference (eval mode, autograd off) each convolution-BatchNorm pair runs as one convolution with the BN
folded into its weights (:mod:`skipviz.engine.folding`). Training and attributions (autograd on) run the modules
as written.

Imports: the engine runs against the policy interface (:mod:`skipviz.policies.base`) with
:class:`~skipviz.policies.simple.FullPolicy` as its default; the policies import only the engine's records
(:mod:`skipviz.engine.trace`), never this module, so the modules form no circle. :class:`ModelMeta` is only
named in annotations (the model families, above the engine, build it).
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from ..policies.base import Policy
from ..policies.simple import FullPolicy
from .blocks import SkippableBlock
from .flops import FlopTable, card_flop_table, count_network_flops
from .heads import GateHead, PlanHead, ProbeHead
from .rows import _swap_plan, gather_rows, scatter_rows_
from .trace import BlockRecord, Reason, SkipResult

if TYPE_CHECKING:  # pragma: no cover
    from ..models.weights import ModelMeta

__all__ = ["SkipNetwork"]


class SkipNetwork(nn.Module):
    """A skippable residual network.

    Args:
        stem: (N, 3, H, W) -> (N, C0, H0, W0).
        blocks: residual blocks in execution order.
        head: (N, C_L, H_L, W_L) -> (N, K) logits (pooling + classifier).
        block_names: one readable name per block (``"stage1.block0"``).
        meta: classes, input size, normalisation, weights identity (see :class:`~skipviz.models.weights.ModelMeta`).
        gates: block index -> gate head, for the blocks that have one.
        probes: one probe head per block, or ``None``.
    """

    #: Activations and convolution weights are channels-last (NHWC in memory): on CPU the default model's full
    #: forward is 1.34x / 1.27x / 1.29x faster than in NCHW at batch 1 / 64 / 256
    #: (benchmarks/results/memory_format_cpu.md), and with weights and inputs in the same layout no convolution
    #: reorders its weights on every call.
    memory_format: torch.memory_format = torch.channels_last

    def __init__(self, stem: nn.Module, blocks: Sequence[SkippableBlock], head: nn.Module, block_names: Sequence[str],
                 meta: ModelMeta, gates: dict[int, GateHead] | None = None,
                 probes: Sequence[ProbeHead] | None = None) -> None:
        super().__init__()
        if len(block_names) != len(blocks):
            raise ValueError("one name per block")
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.gates = nn.ModuleDict({str(i): g for i, g in (gates or {}).items()})
        self.probes = nn.ModuleList(probes) if probes is not None else None
        self.plan_head: PlanHead | None = None  # optional: assign one to use PlanPolicy
        self.block_names = list(block_names)
        self.meta = meta
        self._flop_cache: dict[tuple, FlopTable] = {}  # (input_hw, plan head, gate heads, probes) -> table
        self._flop_lock = threading.Lock()
        self.to(memory_format=self.memory_format)  # weights in the activations' layout: no per-call reorder

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        """The stem on ``x`` (N, 3, H, W) laid out as ``memory_format`` (a no-op when it already is)."""
        return self.stem(x.contiguous(memory_format=self.memory_format))

    # ----------------------------------------------------------------------------------------- structure
    def gate(self, index: int) -> GateHead | None:
        return self.gates._modules.get(str(index))  # one dict lookup (hot path: once per block per run)

    def probe(self, index: int) -> ProbeHead | None:
        return self.probes[index] if self.probes is not None else None

    @property
    def gated_blocks(self) -> list[int]:
        return sorted(int(k) for k in self.gates.keys())

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_channels(self) -> list[int]:
        """Output channels of each block."""
        return [b.out_channels for b in self.blocks]

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain full forward, (N, 3, H, W) -> (N, K) logits; no gates evaluated."""
        h = self._stem(x)
        inplace = not torch.is_grad_enabled()  # the loop owns h: identity blocks may update it in place
        for block in self.blocks:
            # written inline here and in run(): a helper call per block measured 6-10 µs per batch-1 forward
            h = block.forward_(h) if inplace and not block.downsample else block(h)
        return self.head(h)

    def run(self, x: torch.Tensor, policy: Policy | None = None, keep_exit_states: bool = False) -> SkipResult:
        """Run a batch under ``policy`` (default: full), really skipping bypassed blocks.

        Args:
            x: (N, 3, H, W) normalised images.
            keep_exit_states: keep the hidden state of the inputs that leave at an early exit
                (``SkipResult.exit_states``), from which :func:`~skipviz.engine.resume.full_logits` resumes the
                full network instead of starting it again from the image.
        Returns:
            :class:`~skipviz.engine.trace.SkipResult` with ``logits`` (N, K) and the decisions (``executed`` (N, L),
            ``scores`` (N, L), ``traces()``).
        """
        policy = policy or FullPolicy()
        n = x.shape[0]
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        h = self._stem(x)  # a fresh tensor that only this loop holds: safe to update in place without autograd
        inplace = not torch.is_grad_enabled()
        records: list[BlockRecord] = []
        rows: torch.Tensor | None = None  # None: every sample still running (no early exits yet)
        exit_block: torch.Tensor | None = None
        exit_logits: list[tuple[torch.Tensor, torch.Tensor]] = []
        exit_states: list[tuple[int, torch.Tensor, torch.Tensor]] | None = [] if keep_exit_states else None
        # with no exits, mixed identity blocks run on a contiguous window of the batch, in place (_run_contiguous)
        exits = policy.exits_early  # only early-exit policies are asked after each block
        partition = inplace and not exits
        plan = policy.plan(self, h)  # every block decided up front, or None: block by block
        if plan is not None and not exits and plan.uniform():
            # one Python bool per block for every row (a batch of one): run the blocks as the plain forward
            # does, with no per-block policy or bookkeeping work; the records come from the plan afterwards
            for execute, block in zip(plan.execute, self.blocks):
                if not execute:
                    h = block.bypass(h)
                else:
                    h = block.forward_(h) if inplace and not block.downsample else block(h)
            return SkipResult(self, policy, self.head(h), plan.records(), hw, None)
        for i, block in enumerate(self.blocks):
            d = policy.decide(self, i, h) if plan is None else plan.decide(i, rows)
            execute = d.execute
            rec = BlockRecord(rows, execute, d.reason, d.score, d.threshold, d.evaluated)
            records.append(rec)
            if execute.__class__ is bool:  # one decision for every row (a batch of one, a forced or full block)
                if not execute:
                    h = block.bypass(h)
                else:
                    h = block.forward_(h) if inplace and not block.downsample else block(h)
            elif partition and not block.downsample:
                h, rows = self._run_contiguous(block, h, execute, rows)
            else:
                h = self._apply_block(block, h, execute, inplace)
            ex = policy.exit_after(self, i, h) if exits else None
            if ex is not None:
                leave, logits, conf = ex
                rec.score, rec.gate_evaluated = conf, True
                rec.exit_now = leave
                if leave.__class__ is bool:  # a batch of one decided on the host: no tensor, no read-back
                    if not leave:
                        continue
                    leave = torch.ones(1, dtype=torch.bool, device=logits.device)
                if bool(leave.any()):
                    all_rows = rows if rows is not None else torch.arange(n, device=x.device)
                    if exit_block is None:
                        exit_block = torch.full((n,), -1, dtype=torch.long)
                    exit_block[all_rows[leave].cpu()] = i
                    exit_logits.append((all_rows[leave], logits[leave]))
                    if exit_states is not None:
                        exit_states.append((i, all_rows[leave], h[leave]))
                    stay = ~leave
                    rows, h = all_rows[stay], h[stay]
                    if rows.numel() == 0:
                        # everyone has left: later blocks are bypassed with no work at all
                        for j in range(i + 1, len(self.blocks)):
                            records.append(BlockRecord(rows=rows, execute=False, reason=int(Reason.EXITED), score=None,
                                                       threshold=None, gate_evaluated=False))
                        break
        if rows is not None and rows.numel() == 0:
            logits = exit_logits[0][1].new_empty((n, exit_logits[0][1].shape[1]))
        else:
            final = self.head(h)
            logits = final if rows is None else final.new_empty((n, final.shape[1])).index_copy(0, rows, final)
        for r, lg in exit_logits:
            logits = logits.index_copy(0, r, lg.to(logits.dtype))
        return SkipResult(self, policy, logits, records, hw, exit_block, exit_states)

    @staticmethod
    def _run_contiguous(block: SkippableBlock, h: torch.Tensor, execute: torch.Tensor | bool,
                        rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run an identity-shortcut block in place on the rows of ``h`` that execute it, without gathering
        them into a new batch or scattering results back.

        The k executing rows are first made contiguous: of all windows ``h[s:s+k]`` the one already holding
        the most executing rows is chosen (the first such window), and each skipping row inside it is swapped
        with an executing row outside it (2m row copies for m misplaced rows, instead of 2k for a gather plus a
        scatter; rows executing the previous block tend to stay together, so m is small). The block then
        updates the view ``h[s:s+k]`` in place (``forward_``) and the bypassed rows are left as they are,
        which is their identity output. ``rows`` (M,) records which sample of the batch each row of ``h``
        holds (``None``: row i is sample i); it is returned permuted, as a new tensor, so earlier
        :class:`BlockRecord` entries keep theirs. Inference only: no autograd, and ``h`` must be a tensor only
        the caller holds.

        h: (M, C, H, W); execute: (M,) bool or one bool for all. Returns ``(h, rows)``.
        """
        if not torch.is_tensor(execute):  # a scalar that is not a plain bool (run() takes those inline)
            return (block.forward_(h) if execute else h), rows
        flags = execute.tolist()  # one device->host read per block
        k = sum(flags)
        if k == len(flags):
            return block.forward_(h), rows
        if k == 0:
            return h, rows
        start, dst_rows, src_rows = _swap_plan(flags, k)
        if dst_rows:
            dst = torch.tensor(dst_rows, device=h.device)
            src = torch.tensor(src_rows, device=h.device)
            scatter_rows_(h, dst, gather_rows(h, src))  # the gather copies first: a true swap
            if rows is None:
                rows = torch.arange(len(flags), device=h.device)
            rows = rows.index_copy(0, dst, rows.index_select(0, src))
        block.forward_(h[start:start + k])
        return h, rows

    @staticmethod
    def _apply_block(block: SkippableBlock, h: torch.Tensor, execute: torch.Tensor | bool,
                     inplace: bool = False) -> torch.Tensor:
        """Gather the samples that execute ``block``, run it on them alone, scatter the result back.

        h: (M, C, H, W); execute: (M,) bool or a bool for all. Returns (M, C', H', W').
        ``inplace``: an identity block's results are scattered into ``h`` itself (no copy of the bypassed
        rows); only for callers that hold no other reference to ``h`` and need no gradients.
        """
        if not torch.is_tensor(execute):
            return block(h) if execute else block.bypass(h)
        run_idx = execute.nonzero().squeeze(1)  # one host sync per block
        k = run_idx.numel()
        if k == h.shape[0]:
            return block(h)
        if k == 0:
            return block.bypass(h)
        ran = block(gather_rows(h, run_idx))
        if not block.downsample:
            return scatter_rows_(h, run_idx, ran) if inplace else h.index_copy(0, run_idx, ran)
        skip_idx = (~execute).nonzero().squeeze(1)
        skipped = block.bypass(gather_rows(h, skip_idx))
        layout = (torch.channels_last if ran.dim() == 4 and not ran.is_contiguous()
                  and ran.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
        # every row is written below, in place
        out = torch.empty((h.shape[0],) + ran.shape[1:], dtype=ran.dtype, device=ran.device, memory_format=layout)
        return scatter_rows_(scatter_rows_(out, run_idx, ran), skip_idx, skipped)

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int] | int | None = None,
                              policy: Policy | None = None, intermediates_only: bool = False,
                              include_stem: bool = False):
        """Every block's output for a batch, as timm's ``forward_intermediates``.

        Args:
            x: (N, 3, H, W).
            indices: block indices to return (negative counts from the end), an int n for the last n blocks,
                or ``None`` for all.
            policy: run under a skipping policy (default: full). A bypassed block's "output" is its bypass.
                Early-exit policies are refused (``ValueError``): a sample that left has no later features.
            intermediates_only: return only the list.
            include_stem: put the stem output (the first block's input) first in the list.
        Returns:
            ``(logits (N, K), [ (N, C_i, H_i, W_i), ... ])`` or just the list.
        """
        nb = len(self.blocks)
        if indices is None:
            wanted = list(range(nb))
        elif isinstance(indices, int):
            wanted = list(range(nb - indices, nb))
        else:
            wanted = sorted(i % nb for i in indices)
        feats: list[torch.Tensor] = []
        h = self._stem(x)
        if include_stem:
            feats.append(h)
        policy = policy or FullPolicy()
        if policy.exits_early:
            raise ValueError(f"forward_intermediates cannot run an early-exit policy ({policy.name}): a sample "
                             "that exits has no later features; use run() for its decisions and logits")
        last = wanted[-1] if (intermediates_only and wanted) else nb - 1
        plan = policy.plan(self, h)
        for i, block in enumerate(self.blocks[: last + 1]):
            d = policy.decide(self, i, h) if plan is None else plan.decide(i)
            h = self._apply_block(block, h, d.execute)
            if i in wanted:
                feats.append(h)
        if intermediates_only:
            return feats
        return self.head(h), feats

    # ------------------------------------------------------------------------------------------- FLOPs
    def flop_table(self, input_hw: tuple[int, int] | None = None) -> FlopTable:
        """Per-part FLOPs for one input of ``input_hw`` (default: the model's input size), cached."""
        hw = tuple(input_hw or self.meta.input_size[-2:])
        # the heads themselves (held, so no id can be reused): a plan head, gate or probe assigned later changes
        # the table
        key = (hw, self.plan_head, tuple(self.gates.items()), tuple(self.probes or ()))
        with self._flop_lock:
            table = self._flop_cache.get(key)
            if table is None:
                table = card_flop_table(self, hw) or count_network_flops(self, hw)
                if len(self._flop_cache) >= 16:  # replaced heads are not kept alive without bound
                    self._flop_cache.clear()
                self._flop_cache[key] = table
        return table


    def _count_flops(self, hw: tuple[int, int]) -> FlopTable:
        """A fresh count of every part (:func:`~skipviz.engine.flops.count_network_flops`), ignoring the card."""
        return count_network_flops(self, hw)

    # ---------------------------------------------------------------------------------------- training
    def forward_train(self, x: torch.Tensor, gate_temperature: float = 1.0, hard: bool = True,
                      drop_prob: float = 0.0, force_full: bool = False):
        """Training forward with differentiable gates (Gumbel-sigmoid, straight-through when ``hard``).

        During training every block is computed and mixed as ``g * block(h) + (1 - g) * bypass(h)``
        (the only way gradients reach the gates); at inference :meth:`run` skips for real.
        ``drop_prob``: stochastic depth for ungated networks (a block is dropped with this probability).
        ``force_full``: every block runs (gates are not evaluated), for training the full network.
        A gate samples (Gumbel noise, straight-through) when its own head is in training mode, whatever the
        backbone's mode: distillation trains the heads over a backbone kept in eval mode (frozen BatchNorm
        statistics), and the KL must reach the gates there too.

        Returns ``(logits (N, K), gate_probs (N, G) for the gated blocks, probe_logits list of (N, K))``;
        probe heads see detached features, so they never change the backbone.
        """
        h = self._stem(x)
        gate_probs, probe_logits = [], []
        for i, block in enumerate(self.blocks):
            g_head = self.gate(i)
            out = block(h)
            if g_head is not None and not force_full:
                logit = g_head(h)
                soft = torch.sigmoid(logit)
                if g_head.training:
                    u = torch.rand_like(logit).clamp(1e-6, 1 - 1e-6)
                    noisy = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / gate_temperature)
                    g = ((noisy >= 0.5).to(noisy.dtype) - noisy).detach() + noisy if hard else noisy
                else:
                    g = (soft >= 0.5).to(soft.dtype)
                gate_probs.append(soft)
                g = g.view(-1, 1, 1, 1)
                h = g * out + (1 - g) * block.bypass(h)
            elif drop_prob > 0 and self.training and not block.downsample and not force_full:
                keep = (torch.rand(h.shape[0], 1, 1, 1, device=h.device) >= drop_prob).to(h.dtype)
                h = keep * out + (1 - keep) * h
            else:
                h = out
            if self.probes is not None:
                probe_logits.append(self.probes[i](h.detach()))
        logits = self.head(h)
        probs = torch.stack(gate_probs, 1) if gate_probs else logits.new_zeros((x.shape[0], 0))
        return logits, probs, probe_logits
